"""The allowed names of settings that both the config check and the code acting on them need, defined once.

Imports nothing heavy: ``engine.config`` checks a config with them before torch is loaded, and the models
and data modules that act on the same names import them from here.
"""

STEMS = ("cifar", "imagenet")  # model.stem: every backbone builds both
NORMS = ("batch", "group")  # model.norm
IN_MEMORY_CHOICES = ("auto", "true", "false")  # data.in_memory
DECODE_CHOICES = ("cpu", "gpu", "auto")  # data.decode
