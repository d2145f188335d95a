"""`offroad-seg sweep`: many head trainings on features loaded once, searched with Optuna.

A sweep is an Optuna study stored next to its results (`OUT/study.db`, SQLite; or any
database URL several machines reach, `--storage`). Grids are enqueued as fixed trials when the
study is created; sampled searches ask Optuna's TPE sampler for each trial. Every process of
the sweep loads the caches once and trains its trials on them; each trial is a normal run
folder under `OUT/trials/` named after its settings.

Processes share the study: a trial is popped from the storage atomically, and on one machine
a file lock also serialises the "is anything left?" check, so no trial runs twice. A process
killed mid-trial leaves its trial RUNNING: before its next trial any process of the sweep that
sees it dead (on that machine: its pid gone; from any machine: no heartbeat in the study for
`stale_after_s`) marks it failed and enqueues the same settings again, so the interrupted trial
starts over (trainings are deterministic, so the leaderboard ends as if nothing had happened).
Processes of several machines keep their own folders; each one's leaderboard lists the trials
that finished there.

A sampled trial's settings are a function of the sampler seed, its sample index (0, 1, ... in
the order trials were asked; a restarted trial keeps its index) and the trials finished
before it, never of which process asked or how often the sweep was restarted: an interrupted
and resumed search samples what an uninterrupted one does. A trial whose training diverges
(NaN/inf loss) is recorded as failed, with the reason, and is final: reruns do not retry it.

The folder is known as a sweep's by `sweep.json` (written before anything else, with a
`kind` marker). Any other non-empty folder is refused before anything in it is touched, with
or without --overwrite; --overwrite removes only what the sweep wrote: the trial folders its
study records, the study, the leaderboards, the ensemble and the `best` link.

The package: `space` (what is searched: settings, distributions, the sampler, trial names),
`study` (the Optuna study and its storage), `folder` (the output folder: sweep.json, the
checks, --overwrite, the lock), `leaderboard` (its rows and files), `ensemble` (--ensemble-top:
the best trials as one model) and `run` (`sweep()`, the trials this process runs).
"""
