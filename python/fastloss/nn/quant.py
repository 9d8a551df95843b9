"""``QuantLinear``: an ``nn.Linear`` whose weight is stored in 2, 3, 4 or 8 bits, uniform or
with a codebook (:mod:`fastloss.ops.quant`), and a helper that swaps a model's linear layers
for it."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Union

from torch import Tensor, nn

from .. import ops

# a codebook for every layer, or a function of a layer's bit width (e.g. ops.nf_codebook)
Codebook = Optional[Union[Tensor, Callable[[int], Tensor]]]


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` from a packed low-bit ``W`` (buffers ``qweight``, ``scales``, and
    ``zeros`` or ``codebook`` as the format has them, so ``.to()`` and ``state_dict`` carry
    them). The bias stays a float parameter; gradients flow to the input and the bias
    (frozen-weight fine-tuning)."""

    def __init__(self, qw: "ops.QuantizedWeight", bias: Optional[Tensor] = None) -> None:
        super().__init__()
        if not isinstance(qw, ops.QuantizedWeight):  # (not Linear4bit's (in_features, out_features))
            raise TypeError(f"QuantLinear: qw must be a QuantizedWeight (from ops.quantize_weight), got "
                            f"{type(qw).__name__}; build one with QuantLinear.from_linear(linear, bits=...) "
                            f"or quantize_linear_layers_(model)")
        self.out_features, self.in_features = qw.shape
        self.bits, self.group = qw.bits, qw.group
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        self.register_buffer("codebook", qw.codebook)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    # the packed format's tensors: their dtypes are the kernels' layout
    _FORMAT = ("qweight", "scales", "zeros", "codebook")

    def _apply(self, fn, recurse=True):
        # A dtype cast (model.half(), model.to(torch.bfloat16)) converts the bias only: the
        # format's float32 scales / zeros / codebook would otherwise be cast with it, which the
        # kernels refuse (and which would round them). Device moves apply to every tensor.
        kept = {name: self._buffers[name] for name in self._FORMAT if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128,
                    symmetric: bool = True, codebook: Codebook = None) -> "QuantLinear":
        if callable(codebook):
            codebook = codebook(bits)
        qw = ops.quantize_weight(linear.weight, bits, group_size, symmetric, codebook)
        return cls(qw, linear.bias)

    @property
    def quantized_weight(self) -> "ops.QuantizedWeight":
        return ops.QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group,
                                   self.codebook)

    def forward(self, x: Tensor) -> Tensor:
        return ops.dequant_gemm(x, self.quantized_weight, self.bias)

    def extra_repr(self) -> str:
        kind = "uniform" if self.codebook is None else "codebook"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group={self.group}, {kind}, bias={self.bias is not None}")


def quantize_linear_layers_(model: nn.Module, bits: int = 4, group_size: int = 128,
                            symmetric: bool = True,
                            bits_per_layer: Optional[Mapping[str, int]] = None,
                            codebook: Codebook = None, skip: Iterable[str] = ()) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place by a ``QuantLinear`` (mixed precision:
    ``bits_per_layer`` maps qualified layer names to their own bit width; ``codebook`` a tensor,
    or a function of the bit width such as ``ops.nf_codebook``, for non-uniform formats; a
    layer whose input features the group size does not divide is kept per output channel;
    ``skip``: qualified names of layers kept in float, such as an LM head that
    ``nn.LinearCrossEntropy.from_linear`` is to read).
    Only modules of type ``nn.Linear`` itself are replaced (not subclasses such as
    ``nn.MultiheadAttention``'s ``out_proj``); a layer reached under several names (shared)
    becomes one ``QuantLinear``. Every layer is quantized before any is replaced, so an error
    (naming the layer) leaves ``model`` as it was. Returns ``model``."""
    if type(model) is nn.Linear:
        raise ValueError("quantize_linear_layers_: model is itself an nn.Linear, which cannot be replaced "
                         "in place: use QuantLinear.from_linear(model, ...)")
    bits_per_layer = dict(bits_per_layer or {})
    places = []  # (parent, attribute, qualified name, layer)
    for name, module in model.named_modules(remove_duplicate=False):
        # (_modules, not named_children, which yields a module held twice only once)
        for child_name, child in module._modules.items():
            if type(child) is nn.Linear:
                places.append((module, child_name, f"{name}.{child_name}" if name else child_name, child))
    skip = set() if skip is None else {skip} if isinstance(skip, str) else set(skip)
    if not all(isinstance(name, str) for name in skip):
        raise TypeError("quantize_linear_layers_: skip takes qualified layer names (str), as "
                        "model.named_modules() gives them, not modules")
    names = {full for _, _, full, _ in places}
    for arg, given in (("bits_per_layer", set(bits_per_layer)), ("skip", skip)):
        unknown = sorted(given - names)
        if unknown:
            raise ValueError(f"quantize_linear_layers_: {arg} names no nn.Linear of the model: {unknown} "
                             "(only modules of type nn.Linear itself are replaced)")
    both = sorted(skip & set(bits_per_layer))
    if both:
        raise ValueError(f"quantize_linear_layers_: {both} both skipped and given bits in bits_per_layer")
    # (a layer reached under several names is skipped when any of them is)
    kept = {id(child) for _, _, full, child in places if full in skip}
    places = [p for p in places if id(p[3]) not in kept]
    made = {}  # id(layer) -> its QuantLinear (a shared layer stays shared)
    for _, _, full, child in places:
        if id(child) in made:
            continue
        b = bits_per_layer.get(full, bits)
        group = group_size if group_size <= 0 or child.in_features % group_size == 0 else -1
        try:
            made[id(child)] = QuantLinear.from_linear(child, b, group, symmetric, codebook)
        except ValueError as e:
            raise ValueError(f"quantize_linear_layers_: layer {full!r} ({child.in_features} inputs, {b} bits): "
                             f"{e}") from e
    for module, child_name, _, child in places:
        setattr(module, child_name, made[id(child)])
    return model
