"""Weight-only quantization: store the linear layers' weights in 8 or 4 bits, compute in floating point.

Decoding one token multiplies a single activation row by every weight matrix
of the model (a matrix-vector product), so it is limited by how fast the weights
stream from memory, not by arithmetic. Fewer bytes per weight is more tokens/s,
and a smaller checkpoint. Activations stay in floating point ("weight-only").

int8, per output channel, symmetric ("absmax"). Each row c of W (out, in) gets
one scale from its largest magnitude, and 0 maps to 0:

    scale_c = max_j |W_cj| / 127        q_cj = round(W_cj / scale_c)  in [-127, 127]
    W_cj ~ q_cj * scale_c               |W_cj - q_cj * scale_c| <= scale_c / 2
    y = x W^T + b ~ (x q^T) * scale + b     (the scale factors out of each output's sum)

int4, group-wise along the input, asymmetric (a zero point). Sixteen levels are
too few for one scale per row: a single outlier would stretch the step for the
whole row. So each row is cut into groups of `group_size` inputs (32, 64, 128
or 256) and each group g of a row gets its own scale and integer zero point, its
range widened to include 0 so that 0 stays exactly representable:

    lo = min(min W_g, 0)    hi = max(max W_g, 0)
    scale = (hi - lo) / 15  zero = round(-lo / scale)  in [0, 15]
    q = clamp(round(W / scale) + zero, 0, 15)          W ~ (q - zero) * scale,   error <= scale / 2

Two 4-bit codes share one byte (see `pack_int4`). Bytes per weight, counting the
float32 scales (and uint8 zero points) stored beside the codes:

    float32 4     bfloat16 2     int8 1 + 4/in     int4 0.5 + 5/group_size  (0.54 at 128, 0.66 at 32)

How the matmul runs. Every quantized layer has a reference route that is
obviously right, dequantize the weight then `F.linear`, used for checking, for
gradients and on devices without a kernel. On CPU a PyTorch kernel reads the
quantized weight directly; it is 5-50x faster than the reference, and decoding
the "small" preset with it is 1.1-1.3x (int8) and 1.3-1.5x (int4) as fast as
float32 on 2 threads, depending on the host (benchmarks/generate.py; numbers in
docs/quantization.md):

* int8: `torch._weight_int8pack_mm(x, q, scales)` on our (out, in) int8 weight as
  it is. It is fast with bfloat16 activations and ~7x slower with float32 ones,
  so x is rounded to bfloat16 (8 significant bits, relative error <= 2^-9), the
  scales too, and the product comes back in bfloat16 before it is cast to x's
  dtype. That puts the output ~0.3% from the reference's (whose own error is
  ~0.7% on Gaussian weights; ~0.8% with the kernel). The kernel gives wrong
  results (or crashes) when `in` is not a multiple of 16, so such layers take
  the reference route.
* int4: `torch._weight_int4pack_mm_for_cpu`, which wants its own tiled layout,
  made once from ours at first use (`_convert_weight_to_int4pack_for_cpu`) and
  kept beside it: in memory on CPU an int4 layer then holds its codes twice (the
  file holds them once). It dequantizes as (q - 8) * scale + offset, so our
  zero point becomes offset = (8 - zero) * scale; rows are padded to a multiple of
  16. Activations, scales and offsets are bfloat16 here too (float32 activations
  are ~30x slower): again ~0.3% from the reference, next to int4's 8-10%.

Each kernel is checked against the reference once per process on a small probe
(`cpu_kernel_works`); if it is missing or disagrees, the reference route runs.

`quantize_model` swaps a model's nn.Linear layers for these (the MoE router
stays float: it is tiny and its decisions are discrete). A tied output head gets
its own quantized copy, while the embedding lookup stays float. The scheme is
recorded in `model.quantization`, which checkpoint.py writes to config.json so
`load_checkpoint` can rebuild the same layers before loading the weights.
"torch-dynamic-int8" wraps PyTorch's own dynamic quantization (fbgemm; it also
rounds the activations to int8 on the fly) for comparison; it cannot be saved.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from fnmatch import fnmatch
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from binarylm.errors import BinaryLMError
from binarylm.model.linear import Linear
from binarylm.model.moe import MixtureOfExperts

SCHEMES = ("int8", "int4", "torch-dynamic-int8")
SAVED_SCHEMES = ("int8", "int4")  # the ones a checkpoint can hold
GROUP_SIZES = (32, 64, 128, 256)  # int4 groups; the sizes PyTorch's CPU int4 kernel accepts
KERNEL_DTYPE = torch.bfloat16  # activations inside the CPU kernels
INT8_KERNEL_MULTIPLE = 16  # _weight_int8pack_mm is only right when `in` is a multiple of this
INT4_KERNEL_ROWS = 16  # _convert_weight_to_int4pack_for_cpu wants `out` to be a multiple of this


# ------------------------------------------------------------------ int8: per-channel absmax


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> codes (out, in) int8 in [-127, 127] and scales (out,) float32."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)  # (out,)
    scales = torch.where(absmax > 0, absmax / 127, 1.0)  # an all-zero row keeps scale 1 and codes 0
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes (out, in) int8, scales (out,) -> W (out, in) in `dtype`."""
    return (codes.float() * scales.float()[:, None]).to(dtype)


# ------------------------------------------------------------------ int4: group-wise with zero points


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float -> codes (out, in) uint8 in [0, 15], scales (out, G) float32, zeros (out, G) uint8.

    G = in / group_size groups per row; `in` must be a multiple of group_size.
    """
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)  # (out, G, g)
    lo = groups.amin(dim=2).clamp(max=0)  # (out, G): the range always holds 0 ...
    hi = groups.amax(dim=2).clamp(min=0)  # ... so zero = -lo / scale lands in [0, 15]
    scales = torch.where(hi > lo, (hi - lo) / 15, 1.0)  # (out, G); an all-zero group keeps scale 1
    zeros = torch.round(-lo / scales)  # (out, G)
    codes = torch.round(groups / scales[..., None] + zeros[..., None]).clamp(0, 15)  # (out, G, g)
    return codes.to(torch.uint8).reshape(out_features, in_features), scales, zeros.to(torch.uint8)


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes (out, in) in [0, 15], scales and zeros (out, G) -> W (out, in) in `dtype`."""
    out_features, in_features = codes.shape
    groups = codes.reshape(out_features, scales.shape[1], -1).float()  # (out, G, g)
    w = (groups - zeros.float()[..., None]) * scales.float()[..., None]  # (out, G, g)
    return w.reshape(out_features, in_features).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 codes in [0, 15], n even -> (..., n / 2) uint8, two codes per byte.

    Byte j holds code 2j in its low nibble and code 2j + 1 in its high nibble:
    byte = codes[2j] | codes[2j + 1] << 4. The codes of one row stay in one row.
    """
    if codes.dtype != torch.uint8:
        raise BinaryLMError(f"int4 codes must be uint8, got {codes.dtype}")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise BinaryLMError(f"int4 packing needs an even number of codes per row, got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise BinaryLMError(f"int4 codes must lie in [0, 15], got {int(codes.max())}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)  # (..., n / 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., m) uint8 -> (..., 2m) uint8 codes in [0, 15]: the inverse of `pack_int4`."""
    if packed.dtype != torch.uint8 or packed.dim() == 0:
        raise BinaryLMError(f"packed int4 must be a uint8 tensor with at least one dimension, got {packed.dtype} "
                            f"of shape {tuple(packed.shape)}")
    low, high = packed & 0x0F, packed >> 4  # (..., m) each
    return torch.stack([low, high], dim=-1).flatten(-2)  # (..., m, 2) -> (..., 2m), interleaved back


# ------------------------------------------------------------------ layers


class QuantizedLinear(nn.Module):
    """What Int8Linear and Int4Linear share: the choice of route, the reference route, the kernel's cache.

    Tensors are buffers (a quantized layer is frozen, and is saved as it is). A subclass says
    how to dequantize, when its kernel applies, and how to run it on `_kernel_weights`: whatever
    it derives from the buffers for the kernel, made at the first kernel call and dropped when
    new tensors are loaded.
    """

    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def __init__(self):
        super().__init__()
        self._kernel_cache: tuple[torch.Tensor, ...] | None = None

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def uses_kernel(self, x: torch.Tensor) -> bool:
        raise NotImplementedError

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _make_kernel_weights(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.uses_kernel(x):
            return self.kernel_forward(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize the whole weight to x's dtype, then a plain F.linear: obviously right, and slow."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    @property
    def _kernel_weights(self) -> tuple[torch.Tensor, ...]:
        if self._kernel_cache is None:
            self._kernel_cache = self._make_kernel_weights()
        return self._kernel_cache

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._kernel_cache = None  # new tensors: the kernel's are made again at the next use

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    """y = x W^T * scales + b with W stored as int8 codes, one float32 scale per output row.

    Buffers: weight (out, in) int8, scales (out,) float32, bias (out,) float32 or None.
    The kernel reads `weight` as it is; it only keeps the scales in bfloat16.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None).to(weight.device)
        layer.weight, layer.scales = quantize_int8(weight)
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls.from_weight(linear.weight, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(out, in) float weight; `dtype` defaults to the scales' (float32 unless the model was cast)."""
        return dequantize_int8(self.weight, self.scales, dtype or self.scales.dtype)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        return (_kernel_can_take(x) and self.in_features % INT8_KERNEL_MULTIPLE == 0
                and cpu_kernel_works("int8"))

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The CPU kernel, bfloat16 inside (see the module docstring)."""
        (scales,) = self._kernel_weights  # (out,) bfloat16
        rows = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()  # (N, in)
        return _finish(torch._weight_int8pack_mm(rows, self.weight, scales), x, self.bias)  # (..., out)

    def _make_kernel_weights(self) -> tuple[torch.Tensor]:
        return (self.scales.to(KERNEL_DTYPE),)


class Int4Linear(QuantizedLinear):
    """y = x W^T + b with W stored as 4-bit codes, a scale and a zero point per (row, group of inputs).

    Buffers: weight (out, in / 2) uint8, two codes per byte (`pack_int4`);
    scales (out, G) float32; zeros (out, G) uint8 in [0, 15]; bias (out,) float32 or None.
    G = in / group_size. The kernel works on its own copy (`int4_kernel_layout`).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = True):
        super().__init__()
        check_group_size(group_size, in_features)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 128) -> Int4Linear:
        layer = cls(weight.shape[1], weight.shape[0], group_size, bias=bias is not None).to(weight.device)
        codes, layer.scales, layer.zeros = quantize_int4(weight, group_size)
        layer.weight = pack_int4(codes)
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4Linear:
        return cls.from_weight(linear.weight, linear.bias, group_size)

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.weight)  # (out, in) in [0, 15]

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(out, in) float weight; `dtype` defaults to the scales' (float32 unless the model was cast)."""
        return dequantize_int4(self.codes(), self.scales, self.zeros, dtype or self.scales.dtype)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        return _kernel_can_take(x) and cpu_kernel_works("int4")

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The CPU kernel on its own layout, bfloat16 inside (see the module docstring)."""
        tiles, table = self._kernel_weights
        rows = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()  # (N, in)
        y = torch._weight_int4pack_mm_for_cpu(rows, tiles, self.group_size, table)  # (N, out padded)
        return _finish(y[:, : self.out_features], x, self.bias)  # (..., out)

    def _make_kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return int4_kernel_layout(self.weight, self.scales, self.zeros)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def int4_kernel_layout(packed: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 tensors -> (tiles, table) for aten._weight_int4pack_mm_for_cpu.

    packed (out, in / 2), scales and zeros (out, G). The kernel computes
    W = (q - 8) * scale + offset, so offset = (8 - zero) * scale gives our (q - zero) * scale.
    Rows are padded with zeros to a multiple of 16: tiles (out16, in / 2) uint8 in the
    kernel's own order, table (G, out16, 2) bfloat16 holding [scale, offset].
    """
    pad = -packed.shape[0] % INT4_KERNEL_ROWS
    codes = F.pad(unpack_int4(packed).to(torch.int32), (0, 0, 0, pad))  # (out16, in)
    scales = F.pad(scales.float(), (0, 0, 0, pad))  # (out16, G); padded rows are all zero
    offsets = (8 - F.pad(zeros.float(), (0, 0, 0, pad))) * scales  # (out16, G)
    table = torch.stack([scales, offsets], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)  # (G, out16, 2)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2), table


class TorchDynamicInt8Linear(nn.Module):
    """PyTorch's dynamically quantized Linear (int8 weights per channel and int8 activations), for comparison.

    Wrapped to give it `dequantized_weight` like ours, so a quantized head still serves the loss.
    Not saveable: its weights live in an opaque packed object.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        # from_float wants exactly nn.Linear (not a subclass) and reads a `qconfig` attribute: a plain copy
        plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        plain.load_state_dict({name: tensor.detach() for name, tensor in linear.state_dict().items()})
        plain.qconfig = per_channel_dynamic_qconfig
        with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
            warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
            self.inner = DynamicLinear.from_float(plain)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.inner.weight().dequantize().to(dtype)


def _kernel_can_take(x: torch.Tensor) -> bool:
    """The CPU kernels serve float inputs on CPU when no gradient has to flow back through x."""
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and not needs_grad


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Kernel output (N, out) in bfloat16 -> plus the bias, in x's dtype and leading shape (..., out)."""
    if bias is not None:
        y = y + bias  # a float32 bias makes the sum float32: one op for the cast and the add
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


@functools.cache
def cpu_kernel_works(scheme: str) -> bool:
    """Whether PyTorch's CPU kernel for "int8" or "int4" exists here and agrees with the reference route.

    Run once per process on a small seeded probe; our own generator, so the global RNG is untouched.
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 256, generator=generator) * 0.02  # 48 rows: int4 pads them to a multiple of 16
    x = torch.randn(3, 256, generator=generator)
    layer = Int8Linear.from_weight(weight) if scheme == "int8" else Int4Linear.from_weight(weight, group_size=64)
    try:
        with torch.no_grad():
            fast, reference = layer.kernel_forward(x), layer.reference_forward(x)
    except (AttributeError, RuntimeError, NotImplementedError):  # an older PyTorch without this kernel
        return False
    if relative_error(fast, reference) > 0.02:
        warnings.warn(f"PyTorch's CPU {scheme} kernel disagrees with the reference here; using the reference route",
                      stacklevel=2)
        return False
    return True


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| over all elements, in float32."""
    approx, exact = approx.detach().float(), exact.detach().float()
    return float((approx - exact).norm() / exact.norm().clamp(min=1e-30))


# ------------------------------------------------------------------ whole models


def check_scheme(scheme: str, saving: bool = False) -> None:
    if scheme not in SCHEMES:
        allowed = SAVED_SCHEMES if saving else SCHEMES
        raise BinaryLMError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(allowed)}")
    if saving and scheme not in SAVED_SCHEMES:
        raise BinaryLMError(f"a {scheme} model cannot be saved (PyTorch packs its weights in an opaque object); "
                            f"save the float model, or quantize with one of {', '.join(SAVED_SCHEMES)}")


def check_group_size(group_size: int, in_features: int | None = None, name: str = "") -> None:
    if group_size not in GROUP_SIZES:
        raise BinaryLMError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
    if in_features is not None and in_features % group_size:
        layer = f"layer {name} has" if name else "the layer has"
        fits = [str(size) for size in GROUP_SIZES if in_features % size == 0]
        fix = f"use a group size of {' or '.join(fits)}" if fits else "skip this layer or use int8"
        raise BinaryLMError(f"int4 group size {group_size} does not divide the input width: {layer} {in_features} "
                            f"inputs; {fix}")


def quantize_model(model: nn.Module, scheme: str, group_size: int = 128, skip: Iterable[str] = ()) -> nn.Module:
    """Replace the model's nn.Linear layers in place with quantized ones; returns the model.

    scheme: "int8" (per output channel), "int4" (groups of `group_size` inputs) or
    "torch-dynamic-int8" (PyTorch's dynamic quantization, for comparison; cannot be saved).
    skip: layer names or glob patterns to keep in float, e.g. ("lm_head", "blocks.0.*").
    MoE routers always stay float. The model goes to eval mode: a quantized model is for inference.
    """
    check_scheme(scheme)
    if getattr(model, "quantization", None):
        raise BinaryLMError(f"the model is already quantized ({model.quantization['scheme']}); "
                            "quantize the float model, or call dequantize_model first")
    skip = list(skip)
    layers = _linear_layers(model, skip)
    if scheme == "int4":
        for name, linear in layers:
            check_group_size(group_size, linear.in_features, name)
    make = {
        "int8": Int8Linear.from_linear,
        "int4": functools.partial(Int4Linear.from_linear, group_size=group_size),
        "torch-dynamic-int8": TorchDynamicInt8Linear,
    }[scheme]
    with torch.no_grad():
        _replace(model, layers, make)
    model.quantization = _record(scheme, group_size, skip)
    return model.eval()


def dequantize_model(model: nn.Module) -> nn.Module:
    """Quantized layers back to float nn.Linear (weights as dequantized), in place; returns the model.

    A tied output head is tied to the token embedding again, which was never quantized.
    """
    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, (QuantizedLinear, TorchDynamicInt8Linear))]
    _replace(model, layers, _to_linear)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_embeddings", False) and hasattr(model, "token_embedding"):
        model.lm_head.weight = model.token_embedding.weight
    model.__dict__.pop("quantization", None)
    return model


def _to_linear(layer: QuantizedLinear | TorchDynamicInt8Linear) -> Linear:
    bias = layer.inner.bias() if isinstance(layer, TorchDynamicInt8Linear) else layer.bias
    weight = layer.dequantized_weight(torch.float32)
    linear = Linear(layer.in_features, layer.out_features, bias=bias is not None, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _linear_layers(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of every nn.Linear to quantize: not a MoE router, not matched by `skip`."""
    routers = {id(moe.router) for moe in model.modules() if isinstance(moe, MixtureOfExperts)}
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and id(module) not in routers]
    unmatched = [pattern for pattern in skip if not any(fnmatch(name, pattern) for name, _ in linears)]
    if unmatched:
        raise BinaryLMError(f"skip pattern(s) {', '.join(map(repr, unmatched))} match no linear layer; "
                            f"layers are named like {linears[0][0] if linears else 'lm_head'}")
    return [(name, module) for name, module in linears if not any(fnmatch(name, p) for p in skip)]


def _replace(model: nn.Module, layers: list[tuple[str, nn.Module]], make: Callable[[nn.Module], nn.Module]) -> None:
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(layer))


def _record(scheme: str, group_size: int, skip: list[str]) -> dict:
    """What config.json records about the quantization, enough to rebuild the same layers."""
    record: dict = {"scheme": scheme}
    if scheme == "int4":
        record["group_size"] = group_size
    if skip:
        record["skip"] = skip
    return record


# ------------------------------------------------------------------ checkpoints


def quantization_record(model: nn.Module) -> dict | None:
    """The model's quantization as config.json stores it, or None for a float model (used by checkpoint.py)."""
    record = getattr(model, "quantization", None)
    if record is not None:
        check_scheme(record["scheme"], saving=True)
        return dict(record)
    return None


def apply_quantized_structure(model: nn.Module, record: dict) -> nn.Module:
    """Give a freshly built model the quantized layers `record` (from config.json) describes, ready to load into.

    The layers are made empty (shapes only): their contents come from model.safetensors.
    """
    if not isinstance(record, dict) or not isinstance(record.get("scheme"), str):
        raise BinaryLMError(f"config.json has a malformed 'quantization' entry {record!r}; "
                            "expected e.g. {\"scheme\": \"int4\", \"group_size\": 128}")
    unknown = set(record) - {"scheme", "group_size", "skip"}
    if unknown:
        raise BinaryLMError(f"config.json's 'quantization' has unknown keys {', '.join(sorted(unknown))}; "
                            "valid keys: scheme, group_size, skip")
    scheme, group_size, skip = record["scheme"], record.get("group_size", 128), record.get("skip", [])
    check_scheme(scheme, saving=True)
    if not isinstance(skip, list) or not all(isinstance(pattern, str) for pattern in skip):
        raise BinaryLMError(f"config.json's quantization 'skip' must be a list of layer names, got {skip!r}")
    _replace(model, _linear_layers(model, skip), functools.partial(_empty_layer, scheme=scheme, group_size=group_size))
    model.quantization = _record(scheme, group_size, skip)
    return model


def _empty_layer(linear: nn.Linear, scheme: str, group_size: int) -> Int8Linear | Int4Linear:
    """A quantized layer of `linear`'s shape with nothing in it yet."""
    bias = linear.bias is not None
    if scheme == "int8":
        return Int8Linear(linear.in_features, linear.out_features, bias)
    return Int4Linear(linear.in_features, linear.out_features, group_size, bias)


def quantize_checkpoint(source: str | Path, output: str | Path, scheme: str = "int8", group_size: int = 128,
                        skip: Iterable[str] = ()) -> dict:
    """Load a float checkpoint (BinaryLM, Hugging Face or GGUF), quantize it and write a BinaryLM checkpoint.

    Returns a report: scheme, paths, layers quantized and model.safetensors bytes before and after
    (before: the source's weights file, or the float model's tensors for other formats).
    """
    from binarylm.checkpoint import write_checkpoint  # here, not at the top: checkpoint.py imports this module
    from binarylm.interop.convert import load_any

    check_scheme(scheme, saving=True)
    output = Path(output)
    _check_output(source, output)
    model, tokenizer, config = load_any(source)
    if getattr(model, "quantization", None):
        raise BinaryLMError(f"{source} is already quantized ({model.quantization['scheme']}); "
                            "quantize a float checkpoint instead")
    before = _weights_bytes(source, model)
    quantize_model(model, scheme, group_size, skip)
    record = model.quantization
    written = write_checkpoint(output, model, tokenizer, config,
                               metrics={"quantized_from": str(source), "quantization": record})
    after = (written / "model.safetensors").stat().st_size
    layers = sum(isinstance(module, QuantizedLinear) for module in model.modules())
    return {"source": str(source), "output": str(written), **record, "layers": layers,
            "bytes_before": before, "bytes_after": after, "ratio": round(after / before, 4)}


def _check_output(source: str | Path, output: Path) -> None:
    """Refuse an output that is the source (or its latest checkpoint), or an existing non-checkpoint path."""
    from binarylm.checkpoint import resolve_checkpoint

    sources = {Path(source).resolve()}
    try:
        sources.add(resolve_checkpoint(source).resolve())
    except BinaryLMError:  # a Hugging Face or GGUF source
        pass
    if output.resolve() in sources:
        raise BinaryLMError("the output would overwrite the source; choose another output path")
    if output.is_file() or (output.is_dir() and any(output.iterdir()) and not (output / "config.json").is_file()):
        raise BinaryLMError(f"{output} exists and is not a checkpoint; choose a new output path")


def _weights_bytes(source: str | Path, model: nn.Module) -> int:
    """Size of the source's model.safetensors, or of the model's distinct tensors when there is none."""
    from binarylm.checkpoint import resolve_checkpoint

    try:
        return (resolve_checkpoint(source) / "model.safetensors").stat().st_size
    except BinaryLMError:  # a Hugging Face or GGUF source
        tensors = {t.data_ptr(): t for t in model.state_dict().values()}
        return sum(t.numel() * t.element_size() for t in tensors.values())
