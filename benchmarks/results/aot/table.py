"""Builds the tables of README.md from the JSON reports here (python table.py)."""

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))

from experiments.aot import format_bytes  # noqa: E402


def fmt(n):
    return format_bytes(n, missing="-")


def rows(prefix):
    out = []
    for path in glob.glob(os.path.join(HERE, f"{prefix}_*.json")):
        with open(path) as f:
            r = json.load(f)
        for row in r["rows"]:
            out.append((r["topology"]["devices"], r["mesh"]["tensor"], r, row))
    order = {"finetune": 0, "ewc": 1, "gpm": 2, "ema": 3}
    out.sort(key=lambda t: (t[0], t[1], order.get(t[3]["method"], 9)))
    return out


def state_table():
    lines = ["| chips | mesh (data, fsdp, tensor) | method | params | opt state | "
             "method opt state | method memory | state total |",
             "|---|---|---|---|---|---|---|---|"]
    for n, _, r, row in rows("state"):
        m = r["mesh"]
        total = row["params"] + row["opt_state"] + row["memory"]
        lines.append(f"| {n} | ({m['data']}, {m['fsdp']}, {m['tensor']}) | {row['method']} | "
                     f"{fmt(row['params'])} | {fmt(row['opt_state'])} | "
                     f"{fmt(row['method_opt_state'])} | {fmt(row['memory'])} | {fmt(total)} |")
    return "\n".join(lines)


def compiled_table():
    lines = ["| chips | mesh (data, fsdp, tensor) | batch x seq | method | arguments | temp | "
             "code | sum | peak | fits 16 GiB | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, _, r, row in rows("compiled"):
        m, s = r["mesh"], r["settings"]
        shape = f"{s['batch_size']} x {s['seq_len']}"
        head = f"| {n} | ({m['data']}, {m['fsdp']}, {m['tensor']}) | {shape} | {row['method']} |"
        if "error" in row:
            lines.append(f"{head} error: {row['error']} |||||||")
        elif "oom" in row:
            lines.append(f"{head} - | {fmt(row['temp_required'])} needed | - | - | - | "
                         f"**no** (compiler OOM) | {row['compile_s']:.0f} |")
        else:
            fits = "yes" if row["fits"] else "**no**"
            lines.append(f"{head} {fmt(row['argument'])} | {fmt(row['temp'])} | "
                         f"{fmt(row['generated_code'])} | {fmt(row['sum'])} | "
                         f"{fmt(row['peak'])} | {fits} | {row['compile_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(state_table())
    print()
    print(compiled_table())
