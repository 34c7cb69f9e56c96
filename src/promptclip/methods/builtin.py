"""Imports every built-in method file so that each registers itself."""

import importlib

BUILTIN_METHOD_MODULES = ("zeroshot", "coop", "cocoop", "kgcoop", "vpt", "ivlp", "maple", "promptsrc", "dcp",
                         "mugcp", "tcp", "prograd", "mma", "rpo", "mmrl", "mmrlpp", "coprompt", "dept",
                         "promptkd", "tip_adapter", "linear_probe",
                         "clip_adapter", "clip_lora")

for _module in BUILTIN_METHOD_MODULES:
    importlib.import_module(f"{__package__}.{_module}")
