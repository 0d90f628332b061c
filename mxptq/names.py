"""The names the command line offers, as plain data: `mxptq --help` shows them without importing
torch (seconds of start-up). tests/test_cli_help.py checks that they equal the registries they
mirror (formats.FORMATS, scales.SELECTORS, checkpoint.dialects.DIALECTS)."""

FORMAT_NAMES = ("nvfp4", "nvfp4-ue5m3", "mxfp4")
SELECTOR_NAMES = ("absmax", "4over6", "search", "exhaustive")
DIALECT_NAMES = ("compressed-tensors", "modelopt", "native")
BLOCK_SIZES = (4, 8, 16, 32, 64, 128)
