"""Model FLOPs per image from the config (matmuls and convolutions) and MFU against a GPU's peak."""

from __future__ import annotations

from vitcore.config import ViTConfig

__all__ = ["forward_flops", "train_flops", "peak_flops", "mfu"]

# Dense (no sparsity) peak TFLOP/s by GPU-name substring, per precision; tf32 for fp32 matmuls.
_PEAK_TFLOPS = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0}),
    ("V100", {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7}),
    ("4090", {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6}),
]


def _resnet_flops(cfg: ViTConfig, img: int) -> tuple[float, int]:
    """Conv FLOPs of the hybrid's ResNet (stem + bottleneck stages) and its output channels."""
    width = int(64 * cfg.resnet_width)
    side = (img + 1) // 2  # 7x7/2 stem, SAME padding
    flops = 2.0 * side * side * 7 * 7 * 3 * width
    side = (side + 1) // 2  # 3x3/2 max-pool, SAME
    cin = width
    for stage, units in enumerate(cfg.resnet_layers or ()):
        cout, mid = width * 4 * 2**stage, width * 2**stage
        for unit in range(units):
            stride = 2 if (unit == 0 and stage > 0) else 1
            out_side = (side + stride - 1) // stride
            flops += 2.0 * side * side * cin * mid  # conv1 1x1
            flops += 2.0 * out_side * out_side * 9 * mid * mid  # conv2 3x3, stride here
            flops += 2.0 * out_side * out_side * mid * cout  # conv3 1x1
            if unit == 0:
                flops += 2.0 * out_side * out_side * cin * cout  # projection
            side, cin = out_side, cout
    return flops, cin


def forward_flops(cfg: ViTConfig, img_size: int, num_classes: int) -> float:
    """Forward FLOPs per image (2 per multiply-add), counting matmuls, attention products and convs."""
    d = cfg.hidden_size
    grid = img_size // cfg.input_stride
    n_patches = grid * grid
    if cfg.is_hybrid:
        flops, cin = _resnet_flops(cfg, img_size)
    else:
        flops, cin = 0.0, 3
    flops += 2.0 * n_patches * cfg.patch_size**2 * cin * d  # patch embedding
    n = n_patches + (1 if cfg.classifier == "token" else 0)
    per_layer = 2.0 * n * d * 3 * d  # q, k, v
    per_layer += 2.0 * 2 * n * n * d  # q k^T and attn v
    per_layer += 2.0 * n * d * d  # output projection
    per_layer += 2.0 * 2 * n * d * cfg.mlp_dim  # MLP up and down
    flops += cfg.num_layers * per_layer
    head_in = d
    if cfg.representation_size:
        flops += 2.0 * d * cfg.representation_size
        head_in = cfg.representation_size
    flops += 2.0 * head_in * num_classes
    return flops


def train_flops(cfg: ViTConfig, img_size: int, num_classes: int) -> float:
    """Training FLOPs per image: forward plus a backward of twice the forward."""
    return 3.0 * forward_flops(cfg, img_size, num_classes)


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a known GPU at `precision` (fp32 -> TF32 tensor cores), else None."""
    for key, table in _PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            value = table.get(precision, 0.0)
            return value * 1e12 if value else None
    return None


def mfu(img_per_s: float, cfg: ViTConfig, img_size: int, num_classes: int, device_name: str,
        precision: str) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the GPU's peak is unknown."""
    peak = peak_flops(device_name, precision)
    if peak is None:
        return None
    return img_per_s * train_flops(cfg, img_size, num_classes) / peak
