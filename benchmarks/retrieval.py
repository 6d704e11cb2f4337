"""clinqa.adapt.retrieval on a PubMedQA passage corpus: build time, queries/second and recall, BM25 vs
dense (MiniLM) vs fused (reciprocal-rank fusion).

Corpus: the 1,000 expert-labelled PubMedQA abstracts (../shared/data/pubmedqa/ori_pqal.json). Every
CONTEXTS entry and every LONG_ANSWER is a document, chunked into passages of 32 words overlapping by
8 (about 10,800 passages). Queries: each abstract's QUESTION; the relevant set is every passage of
that abstract (contexts and long answer). Reported per mode:

- recall@k: the fraction of questions with at least one passage of their own abstract in the top k
  (DPR-style top-k retrieval accuracy); frac@10: the mean fraction of the abstract's passages in the
  top 10; MRR@10: the mean reciprocal rank of the first relevant passage;
- q/s batched: all questions through one `search_many` call (dense includes embedding the queries);
  q/s single: a sample of questions searched one at a time with `search` (what an interactive query
  pays).

    python benchmarks/retrieval.py [--max-words 32] [--overlap 8] [--single 200] [--index DIR] [--json out.json]

`--index DIR` keeps the index (and reuses it on the next run, with its recorded build times). The load
average is printed before and after: MiniLM's throughput collapses when other processes compete for
the two cores (torch's intra-op threads spin), so compare runs made under similar load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PUBMEDQA, machine, peak_rss_mb, write_json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pubmedqa_documents(path: Path):
    from clinqa.adapt.retrieval import Document

    data = json.loads(path.read_text())
    docs, questions = [], []
    for pmid, row in data.items():
        for i, text in enumerate(row["CONTEXTS"]):
            docs.append(Document(f"{pmid}-c{i}", text, source=f"PMID {pmid}"))
        docs.append(Document(f"{pmid}-la", row["LONG_ANSWER"], source=f"PMID {pmid}"))
        questions.append((pmid, row["QUESTION"]))
    return docs, questions


def evaluate(results, questions, n_relevant, ks=(1, 5, 10)):
    recall = {k: 0 for k in ks}
    frac = mrr = 0.0
    for (pmid, _), hits in zip(questions, results):
        own = [h.passage_id.split("-", 1)[0] == pmid for h in hits]
        first = next((r for r, ok in enumerate(own, 1) if ok), None)
        for k in ks:
            recall[k] += bool(first and first <= k)
        mrr += 1 / first if first and first <= 10 else 0.0
        frac += sum(own[:10]) / n_relevant[pmid]
    n = len(questions)
    return {**{f"recall@{k}": recall[k] / n for k in ks}, "frac@10": frac / n, "mrr@10": mrr / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-words", type=int, default=32)
    ap.add_argument("--overlap", type=int, default=8)
    ap.add_argument("--single", type=int, default=200, help="questions timed one at a time per mode")
    ap.add_argument("--index", type=Path, help="keep the index in this folder, reusing it when it is already there")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    if not PUBMEDQA.exists():
        sys.exit(f"PubMedQA is not at {PUBMEDQA}")

    from clinqa.adapt.retrieval import Index, build_index

    docs, questions = pubmedqa_documents(PUBMEDQA)
    print(f"machine: {machine()}")
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.index or Path(tmp) / "pubmedqa-index"
        t0 = time.perf_counter()
        if Index.is_index(out):
            print(f"reusing the index in {out} (build times as recorded when it was built)")
        else:
            build_index(
                docs,
                out,
                dense=True,
                max_words=args.max_words,
                overlap=args.overlap,
                progress=lambda s, d, t: print(f"  {s} {d}/{t}", end="\r", flush=True) if s == "embed" else None,
            )
            print()
        build_wall = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
        t0 = time.perf_counter()
        index = Index.load(out)
        load_s = time.perf_counter() - t0
        meta = index.meta
        n_relevant: dict[str, int] = {}
        for p in index.passages:
            pmid = p.doc_id.split("-", 1)[0]
            n_relevant[pmid] = n_relevant.get(pmid, 0) + 1
        print(
            f"corpus: {meta['n_documents']} documents -> {meta['n_passages']} passages "
            f"({args.max_words} words, overlap {args.overlap}); {len(questions)} questions; index {size_mb:.1f} MB, "
            f"loads in {load_s:.2f}s"
        )
        index.search("warm up the encoder", k=10, mode="dense")

        texts = [q for _, q in questions]
        rows = {}
        for mode in ("bm25", "dense", "fused"):
            t0 = time.perf_counter()
            results = index.search_many(texts, k=10, mode=mode)
            batched = time.perf_counter() - t0
            sample = texts[: args.single]
            t0 = time.perf_counter()
            for q in sample:
                index.search(q, k=10, mode=mode)
            single = time.perf_counter() - t0
            rows[mode] = {
                "qps_batched": len(texts) / batched,
                "qps_single": len(sample) / single,
                **evaluate(results, questions, n_relevant),
            }

    bs = meta["build_seconds"]
    build = {"bm25": bs["bm25"], "dense": bs["dense"], "fused": bs["bm25"] + bs["dense"]}
    report = {
        "machine": machine(),
        "n_passages": meta["n_passages"],
        "n_questions": len(questions),
        "build_seconds": {**bs, "wall": build_wall},
        "index_mb": size_mb,
        "load_seconds": load_s,
        "modes": rows,
        "peak_rss_mb": peak_rss_mb(),
    }

    print(
        f"\nbuild: chunk {bs['chunk']:.2f}s, BM25 {bs['bm25']:.2f}s, dense {bs['dense']:.1f}s "
        f"({meta['n_passages'] / bs['dense']:.0f} passages/s), save {bs['save']:.2f}s, total {bs['total']:.1f}s"
    )
    cols = ["build s", "q/s batched", "q/s single", "recall@1", "recall@5", "recall@10", "frac@10", "mrr@10"]
    keys = [None, "qps_batched", "qps_single", "recall@1", "recall@5", "recall@10", "frac@10", "mrr@10"]
    print("\n" + f"{'mode':<7}" + "".join(f"{c:>13}" for c in cols))
    for mode, r in rows.items():
        vals = [build[mode]] + [r[k] for k in keys[1:]]
        print(f"{mode:<7}" + "".join(f"{v:>13.3f}" if v < 10 else f"{v:>13.1f}" for v in vals))
    print("\nratio vs bm25")
    for mode, r in rows.items():
        vals = [build[mode] / build["bm25"]] + [r[k] / rows["bm25"][k] for k in keys[1:]]
        print(f"{mode:<7}" + "".join(f"{v:>12.2f}x" for v in vals))
    load_after = os.getloadavg()
    report["load_average"] = {"before": load_before, "after": load_after}
    print(
        f"\npeak RSS {peak_rss_mb():.0f} MB; load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"
    )
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
