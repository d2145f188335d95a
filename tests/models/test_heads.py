"""Segmentation heads: every registered head is tested through the registry, so a new entry is
covered by adding it; old configs and state dicts (the seed head's former name `baseline`)
must keep loading."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from offroad_seg.errors import ConfigError
from offroad_seg.models.heads import (
    HEADS,
    HeadConfig,
    build_head,
    count_parameters,
    flops_per_image,
    get_head_spec,
    head_choices,
    head_defaults_help,
    head_names,
)
from offroad_seg.models.heads.pyramid import PyramidHead
from offroad_seg.training.losses import segmentation_loss

NAMES = head_names()
EMBED, K = 24, 5  # a small backbone embedding width and class count keep every test fast


def config(name: str, layers: int = 1, **kw) -> HeadConfig:
    return HeadConfig(name=name, in_channels=EMBED * layers, layers=layers, num_classes=K, **kw)


def tokens(layers: int, grid: tuple[int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, EMBED * layers, *grid, generator=g)


# ----------------------------------------------------------------------------- registry


def test_registry_lists_the_five_heads_and_the_old_name():
    assert NAMES == ("linear", "seed", "convnext", "pyramid", "upnext")
    assert head_choices() == (*NAMES, "baseline")
    assert get_head_spec("baseline") is HEADS["seed"]
    assert {n: HEADS[n].output_scale for n in NAMES} == {
        "linear": 1,
        "seed": 1,
        "convnext": 1,
        "pyramid": 4,
        "upnext": 4,
    }
    assert head_defaults_help("width") == "seed 128, convnext 96, pyramid 96, upnext 96"
    assert head_defaults_help("depth") == "seed 1, convnext 2, upnext 2"
    assert head_defaults_help("dropout") == (
        "linear 0, seed 0, convnext 0.1, pyramid 0.1, upnext 0.1"
    )


@pytest.mark.parametrize("name", NAMES)
def test_config_takes_the_registry_defaults(name):
    spec, cfg = HEADS[name], HeadConfig(name=name)
    assert (cfg.width, cfg.depth, cfg.dropout) == (spec.width, spec.depth, spec.dropout)
    assert spec.description and "\n" not in spec.description


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"name": "upernet"},
            "head 'upernet': expected one of linear, seed, convnext, pyramid, upnext",
        ),
        ({"in_channels": 384, "layers": 5}, "head in_channels 384: not divisible by layers 5"),
        ({"layers": 0}, "head layers 0: must be at least 1"),
        ({"name": "linear", "width": 64}, "head linear has no width setting (got 64)"),
        ({"name": "pyramid", "depth": 2}, "head pyramid has no depth setting (got 2)"),
        ({"width": -1}, "head width -1: must be positive (0: the default)"),
        ({"dropout": 1.0}, "head dropout 1.0: must be in [0, 1)"),
        ({"kernel_size": 4}, "head kernel size 4: must be odd and positive"),
    ],
)
def test_bad_configs_raise_one_line(kwargs, message):
    with pytest.raises(ConfigError) as e:
        HeadConfig(**kwargs)
    assert str(e.value) == message


# ----------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layers", [1, 4])
@pytest.mark.parametrize("grid", [(3, 5), (19, 34), (1, 1)])
def test_output_shape(name, layers, grid):
    cfg = config(name, layers)
    s = HEADS[name].output_scale
    with torch.no_grad():
        out = build_head(cfg).eval()(tokens(layers, grid))
    assert out.shape == (2, K, grid[0] * s, grid[1] * s)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layers", [1, 4])
def test_gradients_reach_every_parameter_and_layer(name, layers):
    torch.manual_seed(0)
    head = build_head(config(name, layers)).train()
    x = tokens(layers, (3, 5)).requires_grad_()
    labels = torch.randint(0, K, (2, 12, 20))
    segmentation_loss(head(x), labels, None).backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    per_layer = x.grad.abs().sum((0, 2, 3)).reshape(layers, EMBED).sum(1)
    assert (per_layer > 0).all()  # no backbone layer is ignored


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_is_deterministic(name):
    head = build_head(config(name, 4))
    x = tokens(4, (3, 5))
    head.train()(x)  # update any running statistics first
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(head(x), head(x), rtol=0, atol=0)
        # and independent of the batch: no batch statistics in eval mode
        torch.testing.assert_close(head(x[:1]), head(x)[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("layers", "expected"),
    [(1, (0, 0, 0, 0)), (2, (0, 0, 1, 1)), (3, (0, 1, 2, 2)), (4, (0, 1, 2, 3)), (8, (1, 3, 5, 7))],
)
def test_pyramid_levels_read_evenly_spaced_layers_ending_at_the_last(layers, expected):
    # finest level (x4) first: with 4 layers the earliest layer feeds the finest level
    assert PyramidHead(config("pyramid", layers)).level_layers == expected


def test_pyramid_finest_level_reads_the_earliest_layer():
    head = build_head(config("pyramid", 4)).eval()
    outs: dict[int, torch.Tensor] = {}
    for level, proj in enumerate(head.proj):
        proj.register_forward_hook(lambda m, i, o, level=level: outs.__setitem__(level, o))
    reads = []
    for layer in range(4):  # tokens in this layer only; zero tokens project to zero
        x = torch.zeros(1, 4, EMBED, 3, 5)
        x[:, layer] = torch.randn(1, EMBED, 3, 5)
        with torch.no_grad():
            head(x.flatten(1, 2))
        reads.append([bool(outs[level].abs().sum() > 0) for level in range(4)])
    assert reads == [[layer == level for level in range(4)] for layer in range(4)]


@pytest.fixture(scope="module")
def learnable_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and 4x-finer labels that a linear map of the upsampled tokens predicts exactly
    (so every head, the linear one included, can fit them)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, EMBED, 4, 6, generator=g)
    w = torch.randn(K, EMBED, generator=g)
    fine = F.interpolate(x, size=(16, 24), mode="bilinear", align_corners=False)
    labels = torch.einsum("kc,bchw->bkhw", w, fine).argmax(1)
    return x, labels


@pytest.mark.parametrize("name", NAMES)
def test_head_overfits_a_tiny_batch(name, learnable_batch):
    x, labels = learnable_batch
    torch.manual_seed(0)
    head = build_head(config(name)).train()
    opt = torch.optim.AdamW(head.parameters(), lr=3e-2)
    losses = []
    for _ in range(40):
        loss = segmentation_loss(head(x), labels, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.0  # chance is log(5) = 1.6
    assert min(losses[-5:]) < 0.3 * losses[0], losses[::5]


def test_upnext_starts_as_its_token_level_logits_upsampled_bilinearly():
    """The sub-pixel correction starts at zero: the head begins as a token-level head."""
    head = build_head(config("upnext")).eval()
    x = tokens(1, (3, 5))
    seen = {}
    head.classifier.register_forward_hook(lambda m, i, out: seen.update(coarse=out))
    with torch.no_grad():
        out = head(x)
    coarse = seen["coarse"].permute(0, 3, 1, 2)
    expected = F.interpolate(coarse, scale_factor=4, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)


# ----------------------------------------------------------------------------- compatibility


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layers", [1, 4])
def test_config_round_trips_through_a_dict(name, layers):
    cfg = HeadConfig(name=name, in_channels=384 * layers, layers=layers, dropout=0.2)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert HeadConfig.from_dict(d) == cfg and d["name"] == name and d["layers"] == layers


def test_from_dict_rejects_unknown_settings():
    with pytest.raises(ConfigError, match="head config: unknown setting"):
        HeadConfig.from_dict({"name": "seed", "colour": "red"})


# head_config dicts and state-dict shapes written by the version before the registry
OLD_CONFIGS = {
    "baseline": {
        "name": "baseline",
        "in_channels": 384,
        "num_classes": 11,
        "width": 128,
        "depth": 1,
        "dropout": 0.0,
        "kernel_size": 7,
        "mlp_ratio": 4,
        "layer_scale": 1e-06,
    },
    "convnext": {
        "name": "convnext",
        "in_channels": 384,
        "num_classes": 11,
        "width": 96,
        "depth": 2,
        "dropout": 0.1,
        "kernel_size": 7,
        "mlp_ratio": 4,
        "layer_scale": 1e-06,
    },
}
OLD_STATE_SHAPES = {
    "baseline": {
        "stem.0.weight": (128, 384, 7, 7),
        "stem.0.bias": (128,),
        "blocks.0.0.weight": (128, 1, 7, 7),
        "blocks.0.0.bias": (128,),
        "blocks.0.2.weight": (128, 128, 1, 1),
        "blocks.0.2.bias": (128,),
        "classifier.weight": (11, 128, 1, 1),
        "classifier.bias": (11,),
    },
    "convnext": {
        "proj.weight": (96, 384),
        "proj.bias": (96,),
        "norm.weight": (96,),
        "norm.bias": (96,),
        **{
            f"blocks.{i}.{key}": shape
            for i in range(2)
            for key, shape in {
                "gamma": (96,),
                "dwconv.weight": (96, 1, 7, 7),
                "dwconv.bias": (96,),
                "norm.weight": (96,),
                "norm.bias": (96,),
                "fc1.weight": (384, 96),
                "fc1.bias": (384,),
                "fc2.weight": (96, 384),
                "fc2.bias": (96,),
            }.items()
        },
        "classifier.weight": (11, 96),
        "classifier.bias": (11,),
    },
}


def old_state_dict(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {k: 0.1 * torch.randn(shape, generator=g) for k, shape in OLD_STATE_SHAPES[name].items()}


def seed_reference(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    x = F.gelu(F.conv2d(x, sd["stem.0.weight"], sd["stem.0.bias"], padding=3))
    x = F.gelu(F.conv2d(x, sd["blocks.0.0.weight"], sd["blocks.0.0.bias"], padding=3, groups=128))
    x = F.gelu(F.conv2d(x, sd["blocks.0.2.weight"], sd["blocks.0.2.bias"]))
    return F.conv2d(x, sd["classifier.weight"], sd["classifier.bias"])


def convnext_reference(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    def p(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return sd[f"{key}.weight"], sd[f"{key}.bias"]

    x = F.layer_norm(F.linear(x.permute(0, 2, 3, 1), *p("proj")), (96,), *p("norm"))
    for i in range(2):
        b = f"blocks.{i}"
        y = F.conv2d(x.permute(0, 3, 1, 2), *p(f"{b}.dwconv"), padding=3, groups=96)
        y = F.layer_norm(y.permute(0, 2, 3, 1), (96,), *p(f"{b}.norm"))
        y = F.linear(F.gelu(F.linear(y, *p(f"{b}.fc1"))), *p(f"{b}.fc2"))
        x = x + sd[f"{b}.gamma"] * y
    return F.linear(x, *p("classifier")).permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    ("old", "new", "reference"),
    [("baseline", "seed", seed_reference), ("convnext", "convnext", convnext_reference)],
)
def test_old_checkpoints_load_strictly_and_compute_the_same(old, new, reference):
    cfg = HeadConfig.from_dict(OLD_CONFIGS[old])
    assert cfg.name == new and cfg.layers == 1
    assert cfg == HeadConfig(name=old) == HeadConfig(name=new)
    head = build_head(cfg).eval()
    sd = old_state_dict(old)
    head.load_state_dict(sd, strict=True)
    x = torch.randn(2, 384, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(head(x), reference(sd, x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- cost


@pytest.mark.parametrize("layers", [1, 4])
def test_exact_parameter_and_flop_counts(layers):
    c, hw = 384 * layers, 19 * 34
    linear = HeadConfig(name="linear", in_channels=c, layers=layers, num_classes=11)
    assert count_parameters(build_head(linear)) == c * 11 + 11 + 2 * c
    assert flops_per_image(linear, (19, 34)) == 2 * hw * c * 11
    seed = HeadConfig(name="seed", in_channels=c, layers=layers, num_classes=11)
    assert count_parameters(build_head(seed)) == (
        c * 128 * 49 + 128 + 128 * 49 + 128 + 128 * 128 + 128 + 128 * 11 + 11
    )
    assert flops_per_image(seed, (19, 34)) == 2 * hw * (
        c * 128 * 49 + 128 * 49 + 128 * 128 + 128 * 11
    )
    convnext = HeadConfig(name="convnext", in_channels=c, layers=layers, num_classes=11)
    block = 96 * 49 + 2 * 96 * 384
    assert flops_per_image(convnext, (19, 34)) == 2 * hw * (c * 96 + 2 * block + 96 * 11)
    upnext = HeadConfig(name="upnext", in_channels=c, layers=layers, num_classes=11)
    # convnext's, the context (one token per image) and the sub-pixel logits (4x4 per token)
    assert flops_per_image(upnext, (19, 34)) == (
        2 * hw * (c * 96 + 2 * block + 96 * 11 + 96 * 11 * 16) + 2 * 96 * 96
    )


@pytest.mark.parametrize("name", NAMES)
def test_cost_is_positive_and_grows_with_the_grid(name):
    cfg = HeadConfig(name=name)
    assert count_parameters(build_head(cfg)) > 0
    small, large = flops_per_image(cfg, (10, 16)), flops_per_image(cfg, (20, 32))
    assert small > 0 and 3.6 < large / small <= 4.0  # ~ area; pooling branches grow slower


def test_pyramid_cost_is_dominated_by_its_fine_level_convs():
    cfg = HeadConfig(name="pyramid")  # width 96, 384 channels
    w, fine = cfg.width, 16 * 19 * 34
    fuse = 2 * fine * 4 * w * w * 9  # the 3x3 conv over the 4 concatenated levels at x4
    fpn = 2 * fine * w * w * 9
    flops = flops_per_image(cfg, (19, 34))
    assert fuse + fpn < flops < 1.6 * (fuse + fpn)
