#!/usr/bin/env python3
"""Run llama.cpp's OpenAI-compatible server in-process via xllamacpp.

Used by scripts/local-model; not meant to be run by hand (but it can be):

    .venv-model/bin/python scripts/local_model_server.py --model PATH --port 8088

Binds to 127.0.0.1 only. Blocks until SIGTERM/SIGINT, then exits.
"""

import argparse
import os
import signal
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="path to the .gguf file")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8088)
    ap.add_argument("--parallel", type=int, default=8,
                    help="number of parallel slots (concurrent requests)")
    ap.add_argument("--ctx-per-slot", type=int, default=2048,
                    help="context tokens per slot; n_ctx = parallel * this")
    ap.add_argument("--alias", default="smollm2-135m-instruct",
                    help="model id reported by /v1/models")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads (0 = number of CPUs)")
    args = ap.parse_args()

    # Own session: not affected by the caller's terminal (Ctrl-C, hangup).
    try:
        os.setsid()
    except OSError:
        pass  # already a process-group leader

    if not os.path.isfile(args.model):
        print(f"local_model_server: model file not found: {args.model}", file=sys.stderr)
        return 2

    # ggml's CPU backend uses OpenMP. With the default (active, spinning) wait
    # policy, token generation collapses ~10x (36 -> 3.5 tok/s measured on a
    # 2-core box) as soon as anything else (cargo, a compiler) wants the CPU.
    # PASSIVE costs little when the machine is idle. Must be set before the
    # native library loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import xllamacpp as xlc

    threads = args.threads or (os.cpu_count() or 1)

    params = xlc.CommonParams()
    params.model.path = args.model
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.parallel
    # llama.cpp splits n_ctx evenly across the parallel slots.
    params.n_ctx = args.parallel * args.ctx_per_slot
    params.cont_batching = True
    params.model_alias = {args.alias}
    params.offline = True  # never try to reach a model hub
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads

    # Block SIGTERM/SIGINT before the native server threads exist, so they all
    # inherit the mask and the main thread alone receives them via sigwait().
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)

    server = xlc.Server(params)  # starts the HTTP server in background threads
    print(f"local_model_server: listening on {server.listening_address} "
          f"(n_parallel={args.parallel}, n_ctx={params.n_ctx}, threads={threads})",
          file=sys.stderr, flush=True)

    signum = signal.sigwait(stop_signals)
    print(f"local_model_server: got signal {signum}, exiting", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # The native server threads have no clean shutdown hook exposed;
    # exit hard so the port is released immediately.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
