"""Optional back-ends: quiet on import, and kept from silently breaking training."""

from __future__ import annotations

import logging

from torch import nn


class DropOptionalKernelNotice(logging.Filter):
    """peft imports bitsandbytes whenever it is installed, and bitsandbytes then logs that an optional CPU kernel
    package (`kernels`) is missing; its CPU path works without it, and nothing here uses bitsandbytes unless the
    client is quantized. Drop that one notice so that importing hosfl_hf (and `hosfl-hf --help`) prints nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(DropOptionalKernelNotice())


def keep_4bit_layers_differentiable(model: nn.Module) -> int:
    """Turns off bitsandbytes' CPU repacking of 4-bit weights in `model`; returns the number of 4-bit layers.

    On a CPU with AVX512-BF16, bitsandbytes (>= 0.49) repacks a `Linear4bit` weight in place on its first eval-mode
    forward without grad, and from then on runs *every* forward of that layer, training ones included, through
    `gemv_4bit`, which has no autograd kernel: the gradient through the layer is silently zero (the server's LoRA
    never trains and lambda at the cut misses every path through a 4-bit layer), and the repacked absmax is
    rounded to bf16, so the layer's outputs change too. HO-SFL runs such eval forwards (the split check, the
    clients' no-grad forward) on layers that are trained through afterwards, so the repacking is disabled, and a
    weight that was already repacked is restored to the standard layout.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        count += 1
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
    return count
