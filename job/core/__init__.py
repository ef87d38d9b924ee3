"""The floor every other layer stands on: the run config, errors and exit codes, the run folder's files and how
they are written, checkpoints, units (throughput, MFU, perplexity) and the launch topology. Stdlib-only at
import time (torch and transformers are imported inside the functions that need them)."""
