"""Plain nn.Modules: no argparse, no file I/O, no training loops."""
