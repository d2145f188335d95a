"""Running a trained head end to end from the images: engines (PyTorch or ONNX Runtime),
output folders that resume and own what they wrote, batches shared by evaluate and predict,
evaluation, prediction (images and videos), and export to ONNX.

Layer: beside `training` (neither imports the other), above `features`.
"""
