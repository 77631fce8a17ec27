#!/usr/bin/env python3
"""llama.cpp as the generation anchor: convert an HF Mixtral export of `moe` to GGUF with
llama.cpp's own converter, load it with llama.cpp (llama-cpp-python bindings, 2 threads),
time batch-1 greedy generation (PROMPT_LEN random prompt tokens, then TOKENS new ones,
the same shape `moe bench generate` and hf_mixtral_bench.py beside this script time), and print the
greedy continuation of a text prompt so it can be compared with `moe generate`.

usage: llamacpp_anchor.py HF_DIR [--prompt TEXT] [--tokens 128] [--prompt-len 16]
       [--threads 2] [--rounds 3] [--gguf OUT.gguf]
Needs: a virtualenv with llama-cpp-python, gguf, sentencepiece, transformers, torch,
tokenizers; the llama.cpp tree (for convert_hf_to_gguf.py) from llama-cpp-python's sdist,
named by LLAMA_CPP_TREE (see README.md beside this file).
"""
import argparse, glob, json, os, random, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = ([os.environ["LLAMA_CPP_TREE"]] if os.environ.get("LLAMA_CPP_TREE") else
        sorted(glob.glob(os.path.join(HERE, "..", ".refs-cache", "llama_cpp_python-*", "vendor", "llama.cpp"))))


def convert(hf_dir, out):
    if not TREE:
        sys.exit("no llama.cpp tree: set LLAMA_CPP_TREE (see README.md beside this script)")
    tree = TREE[-1]
    # Our BPE is trained on the corpus, so llama.cpp's table of known pre-tokenizer hashes
    # does not list it; it is a byte-level BPE with GPT-2's split rule, so say so.
    shim = (
        "import sys, runpy; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
        "import conversion.base as b\n"
        "orig = b.TextModel.get_vocab_base_pre\n"
        "def pre(self, tok):\n"
        "    try: return orig(self, tok)\n"
        "    except NotImplementedError: return 'gpt-2'\n"
        "b.TextModel.get_vocab_base_pre = pre\n"
        "sys.argv = ['convert_hf_to_gguf.py', %r, '--outfile', %r, '--outtype', 'f32']\n"
        "runpy.run_path(%r, run_name='__main__')\n"
    ) % (tree, os.path.join(tree, "gguf-py"), hf_dir, out, os.path.join(tree, "convert_hf_to_gguf.py"))
    r = subprocess.run([sys.executable, "-c", shim], capture_output=True, text=True)
    if r.returncode != 0 or not os.path.exists(out):
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        sys.exit("convert_hf_to_gguf failed")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gguf", default=None)
    a = ap.parse_args()
    out = a.gguf or os.path.join(a.hf_dir, "model-f32.gguf")
    if not os.path.exists(out):
        convert(a.hf_dir, out)
    from llama_cpp import Llama
    cfg = json.load(open(os.path.join(a.hf_dir, "config.json")))
    n_ctx = min(int(cfg.get("max_position_embeddings", 256)), a.prompt_len + a.tokens + 8)
    llm = Llama(model_path=out, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=n_ctx,
                n_batch=max(a.prompt_len, 32), verbose=False)
    vocab = llm.n_vocab()
    import llama_cpp

    def greedy(prompt, n):
        out = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == n:
                break
        return out

    rates, evals = [], []
    for r in range(a.rounds + 1):
        rng = random.Random(r)
        prompt = [rng.randrange(vocab) for _ in range(a.prompt_len)]
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        t0 = time.perf_counter()
        got = greedy(prompt, a.tokens)
        dt = time.perf_counter() - t0
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        assert len(got) == a.tokens, len(got)
        if r > 0:  # round 0 is the warm-up
            rates.append(a.tokens / dt)  # new tokens per second, prompt time included, as the others count
            evals.append(1e3 * perf.n_eval / max(perf.t_eval_ms, 1e-9))
    rates.sort()
    print(f"llama.cpp generate {rates[len(rates)//2]:.1f} tok/s (rounds {', '.join(f'{x:.1f}' for x in rates)}; "
          f"{a.prompt_len}+{a.tokens} tokens, batch 1, greedy, {a.threads} threads, f32 GGUF; "
          f"llama.cpp's own decode timer: {sorted(evals)[len(evals)//2]:.1f} tok/s)")
    if a.prompt is not None:
        from tokenizers import Tokenizer
        tk = Tokenizer.from_file(os.path.join(a.hf_dir, "tokenizer.json"))
        ids = tk.encode(a.prompt).ids
        print("greedy:", json.dumps(tk.decode(greedy(ids, a.tokens))))


if __name__ == "__main__":
    main()
