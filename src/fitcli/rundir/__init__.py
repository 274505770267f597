"""The run directory: the one owner of what a run directory holds and how it is written and read.

- `files`: file names, atomic writes, the checked opener (`read_run_file`), and claiming,
  creating and installing run directories (torch-free).
"""
