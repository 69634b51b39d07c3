"""Benchmark helpers (outside the serving pipeline), shared by the scripts in bench/.

The scripts run as `python bench/bench_x.py` from the repository root with the venv active;
Python puts the script's directory on the import path, so `import benchkit` works as it is.

* `benchkit.imports`: the repository's paths, and a finder for what is not installed (the
  repository's test helpers, a llama_cpp build in a `pip --target` directory).
* `benchkit.daemon`: a real `m4d` subprocess on a temporary socket, waited for until it
  serves; the image's manifest; the kernel variant it runs.
* `benchkit.cpu`: how busy other processes kept the shared machine while we measured.
* `benchkit.inputs`: prompts and sentences, the same for every bench.
* `benchkit.streams`: Generate calls timed at the client, one stream or N at once.
* `benchkit.llama`: llama-cpp-python, the decoder reference (`--llama-cpp DIR`).
* `benchkit.report`: medians, ratios, alternation, progress lines, tables, `--json`.
* `benchkit.options`: the command-line options the scripts share.
"""
