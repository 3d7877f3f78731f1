import memory_bank  # noqa: F401  (checks that `kernels` is memstream's own package)
