#!/usr/bin/env python3
"""Load test for `moe serve` (or any OpenAI-compatible server): CLIENTS concurrent clients
each send REQUESTS chat completions; prints throughput and latency percentiles.

    python3 benches/serve_load.py --url http://127.0.0.1:8080/v1 --clients 8 --requests 4

Standard library only, so it runs wherever Python 3 does.
"""
import argparse
import json
import threading
import time
import urllib.request


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()

    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def client(index):
        for i in range(args.requests):
            body = json.dumps({
                "model": "any",
                "messages": [{"role": "user", "content": f"Speak, scene {index}.{i}:"}],
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "seed": index * 1000 + i,
            }).encode()
            request = urllib.request.Request(
                args.url + "/chat/completions", body, {"Content-Type": "application/json"})
            sent = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=600) as response:
                    answer = json.load(response)
            except Exception as error:  # report, don't stop the other clients
                with lock:
                    errors.append(str(error))
                continue
            with lock:
                latencies.append(time.perf_counter() - sent)
                tokens.append(answer["usage"]["completion_tokens"])

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(json.dumps({
        "clients": args.clients,
        "requests": len(latencies),
        "errors": len(errors),
        "wall_s": round(wall, 2),
        "completion_tokens_per_s": round(sum(tokens) / wall, 1),
        "requests_per_s": round(len(latencies) / wall, 2),
        "latency_p50_s": round(pick(0.5), 3) if latencies else None,
        "latency_p99_s": round(pick(0.99), 3) if latencies else None,
    }))
    if errors:
        print("first error:", errors[0])


if __name__ == "__main__":
    main()
