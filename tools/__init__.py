"""Tools around the product, not part of it: benchmarks and the GPU check.

bench_pipeline.py   `python -m tools.bench_pipeline`: the input pipeline against the original feed and peers
bench_peers.py      the peers it measures (webdataset, LitData, Mosaic Streaming) at their documented settings
bench_train.py      `python -m tools.bench_train`: who waits, the loader or the model
gpu_check.py        `make gpu-check`: every GPU figure from one command on a fresh machine
"""
