"""The accountant: shapes and their rounding, parameters, FLOPs and memory of a step, predicted on
fake tensors and measured on real ones. Imports nothing from `training`, `viz` or `cli`."""
