"""Model compression (`lmforge compress`): quantization, pruning, distillation, low-rank factorisation and weight
sharing, each writing a run folder that every other stage reads."""
