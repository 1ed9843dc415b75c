"""The attribution engine, one module per family; ``utils_if`` is its façade and maps each family to
its module and formula. The engine knows no settings key: it takes plain arguments."""
