"""Optional back-ends stay quiet on import."""

import logging


class DropOptionalKernelNotice(logging.Filter):
    """peft imports bitsandbytes whenever it is installed, and bitsandbytes then logs that an optional CPU kernel
    package (`kernels`) is missing; its CPU path works without it, and nothing here uses bitsandbytes unless the
    client is quantized. Drop that one notice so that importing hosfl_hf (and `hosfl-hf --help`) prints nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(DropOptionalKernelNotice())
