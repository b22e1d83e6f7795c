"""Peak memory and time of `attribute` on real Gemma 3 270M for long prompts, one fresh process per length.

    python -m part3_attribution_graphs.tools.memory --tokens 128 512 --max-feature-nodes 2048

The prompt is held-out English prose (after the text the transcoders were fitted on), cut to the
requested number of tokens. Peak memory is the child process's maximum resident set (ru_maxrss),
which includes the model (about 1.1 GB in float32) and everything `attribute` allocates.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(n_tokens: int, max_feature_nodes: int | None, top_k: int) -> dict:
    """Run in this process: load, attribute one prompt of about `n_tokens`, report peak RSS and seconds."""
    from part3_attribution_graphs.attribution import attribute
    from part3_attribution_graphs.nodes import NodeType
    from part3_attribution_graphs.worlds.gemma270m import (
        N_FIT_SEQ,
        SEQ_LEN,
        calibration_tokens,
        load_gemma3_270m_offline,
        peak_rss_gib,
    )

    model, transcoders = load_gemma3_270m_offline()
    after_fit = -(-N_FIT_SEQ * (SEQ_LEN - 1) // (n_tokens - 1))  # first sequence past the fitting text
    ids = calibration_tokens(model.tokenizer, 1, offset=after_fit, seq_len=n_tokens)[0, 1:].tolist()
    prompt = model.tokenizer.decode(ids)
    loaded = peak_rss_gib()
    t0 = time.perf_counter()
    result = attribute(
        model, transcoders, prompt, start_posn=1, top_k=top_k, max_feature_nodes=max_feature_nodes
    )
    seconds = time.perf_counter() - t0
    return dict(
        n_tokens=model.to_tokens(prompt).shape[1],
        max_feature_nodes=max_feature_nodes,
        top_k=top_k,
        n_nodes=len(result.graph),
        n_latents=sum(n.node_type == NodeType.LATENT for n in result.graph.nodes),
        seconds=seconds,
        peak_gib=peak_rss_gib(),
        after_load_gib=loaded,
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--max-feature-nodes", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.tokens[0], args.max_feature_nodes, args.top_k)))
        return []
    out = []
    for n in args.tokens:  # a fresh process each, so one length's peak does not hide the next one's
        cmd = [
            sys.executable,
            "-m",
            "part3_attribution_graphs.tools.memory",
            "--child",
            "--tokens",
            str(n),
            "--max-feature-nodes",
            str(args.max_feature_nodes),
            "--top-k",
            str(args.top_k),
        ]
        res = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
        print(
            f"{res['n_tokens']} tokens, top_k={res['top_k']}, max_feature_nodes={res['max_feature_nodes']}: "
            f"{res['n_nodes']} nodes ({res['n_latents']} latents), {res['seconds']:.0f} s, peak RSS "
            f"{res['peak_gib']:.2f} GiB ({res['after_load_gib']:.2f} GiB after loading the model)",
            flush=True,
        )
        out.append(res)
    return out


if __name__ == "__main__":
    main()
