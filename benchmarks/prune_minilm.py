"""Pruning MiniLM (all-MiniLM-L6-v2): FFN channel pruning and low-rank vs fp32, speedup and cosine.

The model is exported offline (``examples/minilm_export.py``, dynamo) as (input_ids, attention_mask)
-> L2-normalized mean-pooled sentence embeddings. Sentences below are tokenized with the model's own
tokenizer; the calibration sentences (used for the least-squares repair and the data-aware SVD) are
disjoint from the evaluation sentences (used for cosine). Calibration and evaluation batches are
padded to their longest sentence (padding rows carry nothing into the mean-pooled embedding and
would swamp the fits); latency is timed on evaluation sentences padded to ``seq_len`` tokens.

Rows: fp32; ``ffn R``: R of the 1536 intermediate channels of every BERT FFN removed (W1 columns,
its bias, W2 rows; the Erf-GELU between them follows), then W2 refit by least squares on the
calibration activations (the cosine without the repair is shown too); ``low-rank``: every dense
MatMul factored by data-aware SVD where it pays in arithmetic (energy e kept, or a share R of each
layer's rank removed; energy is measured on the layer's outputs, so MiniLM's few outlier hidden
dimensions make low energies keep very low ranks). Plain SVD (no data) keeps 0.95 energy only at
ranks that do not pay on these near-full-rank weights, so no layer is factored; it is not shown.
Columns: parameters ratio (all initializers, embeddings included) and MACs ratio (weight MatMuls
per token: what Torch-Pruning reports), measured p50 latency ratio at batch 1 and 32 (all models
timed interleaved in one loop per batch size: what users feel), and min/mean cosine of the
evaluation sentences' embeddings vs fp32.

``python -m benchmarks prune_minilm`` (or ``python benchmarks/prune_minilm.py``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

CALIBRATION_SENTENCES = [
    "The train to Lyon leaves at half past seven from platform four.",
    "She planted tomatoes, basil and two rows of beans in the spring.",
    "Interest rates were left unchanged at the central bank's meeting.",
    "My laptop battery drains quickly when the screen is at full brightness.",
    "The museum reopened after a two-year renovation of its east wing.",
    "Can you recommend a good book about the history of mathematics?",
    "A strong earthquake shook the coastal town early on Tuesday morning.",
    "The recipe calls for three eggs, a cup of flour and a pinch of salt.",
    "Our team finally fixed the memory leak in the image decoder.",
    "He ran the marathon in just under three and a half hours.",
    "The committee postponed its vote on the new zoning regulations.",
    "Whales communicate over long distances using low-frequency sounds.",
    "Please remember to water the plants while I am away.",
    "The startup raised forty million dollars in its latest funding round.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The hotel room had a lovely view of the harbour and the old lighthouse.",
    "Compilers translate source code into machine instructions.",
    "The children built a snowman with a carrot for a nose.",
    "Shares of the carmaker fell after it cut its annual forecast.",
    "I think the meeting would be more useful if it were shorter.",
    "The violinist played a Bach partita as an encore.",
    "Heavy rain caused flooding on several roads near the river.",
    "Regular exercise lowers the risk of heart disease.",
    "The database query timed out because the index was missing.",
    "We watched the sunset from the top of the hill.",
    "The novel follows three generations of a family in Naples.",
    "Customs officers seized a shipment of counterfeit watches.",
    "Turn left at the bakery and the post office is on your right.",
    "The goalkeeper saved a penalty in the final minute of the match.",
    "Neural networks are trained by gradient descent on a loss function.",
    "The city plans to add two hundred kilometres of bike lanes.",
    "Grandma's apple pie is still the best dessert I have ever had.",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
    "Our flight was delayed by three hours due to fog.",
    "The law requires companies to disclose their carbon emissions.",
    "A good night's sleep improves memory and concentration.",
    "The software update adds support for wireless charging.",
    "The dog barked at the mail carrier every single morning.",
    "Wheat prices rose sharply after the drought in the region.",
    "The lecture covered the causes of the French Revolution.",
    "I lost my keys somewhere between the gym and the supermarket.",
    "Engineers tested the bridge with heavy trucks before it opened.",
    "The band announced a world tour starting in September.",
    "Vaccines train the immune system to recognise a pathogen.",
    "The printer on the third floor is out of toner again.",
    "The river freezes over for about two months every winter.",
    "Negotiations between the union and management broke down.",
    "This cafe serves the strongest espresso in town.",
    "Volcanic ash grounded flights across northern Europe.",
    "The students presented their robotics project to the judges.",
    "Add the onions and cook until they are soft and golden.",
    "The senator denied the allegations in a brief statement.",
    "Saturn's rings are made mostly of ice and rock.",
    "Our internet connection keeps dropping every few minutes.",
    "The painter used bright colours to capture the market scene.",
    "The pharmacy is closed on Sundays and public holidays.",
    "Electric cars accounted for a fifth of new sales last year.",
    "The kitten fell asleep in a basket of clean laundry.",
    "Archaeologists uncovered a Roman mosaic beneath the car park.",
    "You should back up your files before installing the update.",
]

EVALUATION_SENTENCES = [
    "The cat sits on the mat.",
    "A feline is resting on a rug.",
    "Quarterly revenue grew by twelve percent.",
    "ONNX Runtime runs exported models on many devices.",
    "The bus to the airport runs every twenty minutes.",
    "He cooked a spicy curry with lentils and spinach.",
    "Inflation slowed for the third consecutive month.",
    "The phone overheats when I play games for too long.",
    "The gallery is showing a retrospective of her early photographs.",
    "Where can I find a cheap place to stay near the station?",
    "Firefighters contained the wildfire after four days.",
    "Whisk the cream until it forms soft peaks.",
    "The pull request adds unit tests for the parser.",
    "She swam across the lake in under an hour.",
    "Parliament passed the budget by a narrow margin.",
    "Bees navigate using the position of the sun.",
    "Don't forget to lock the back door before you leave.",
    "The company reported a loss despite higher sales.",
    "Mitochondria produce most of the cell's energy.",
    "From the balcony we could see the whole valley.",
    "A hash table gives constant-time lookups on average.",
    "The twins built a treehouse in the garden.",
    "Oil prices dropped after the cartel raised output.",
    "Honestly, I preferred the first season of the show.",
    "The orchestra tuned up before the symphony began.",
    "Strong winds knocked down power lines across the county.",
    "Drinking enough water helps prevent headaches.",
    "The server crashed because the disk was full.",
    "They hiked through the forest until it got dark.",
    "The biography describes the scientist's years in exile.",
    "Police arrested two suspects after the bank robbery.",
    "Take the second exit at the roundabout.",
    "The striker scored twice in the second half.",
    "Transformers use attention to relate every token to every other.",
    "The town council approved a new public swimming pool.",
    "Nothing beats fresh bread straight from the oven.",
    "The telescope captured images of a distant galaxy.",
    "Our luggage was sent to the wrong city.",
    "New rules limit how long drivers can work without a break.",
    "Meditation can reduce stress and anxiety.",
    "The new firmware fixes a bug in the Bluetooth stack.",
    "The parrot can say hello in three languages.",
    "Coffee harvests suffered from an unusually cold winter.",
    "The seminar examined the rise of the Roman Empire.",
    "I left my umbrella on the train this morning.",
    "The tunnel took eight years to build.",
    "The singer cancelled her concert because of a sore throat.",
    "Antibiotics do not work against viral infections.",
    "The elevator has been out of order since Monday.",
    "Glaciers in the Alps are shrinking every year.",
    "Workers went on strike demanding better pay.",
    "The bakery on the corner sells excellent croissants.",
    "An eclipse darkened the sky for nearly four minutes.",
    "Students learned to program small robots in class.",
    "Simmer the sauce for twenty minutes, stirring often.",
    "The minister resigned amid a growing scandal.",
    "Mars has the tallest volcano in the solar system.",
    "My headphones stopped charging after I dropped them.",
    "The sculptor carved the statue from a single block of marble.",
    "Is the library open late on Thursdays?",
]


def _embeddings_cosine(reference, got):
    import numpy as np

    dots = (reference * got).sum(1)
    return dots / (np.linalg.norm(reference, axis=1) * np.linalg.norm(got, axis=1))


def run(
    ffn_ratios: tuple[float, ...] = (0.125, 0.25, 0.5),
    energies: tuple[float, ...] = (0.99, 0.999),
    rank_ratios: tuple[float, ...] = (0.75,),
    seq_len: int = 64,
    threads: int | None = None,
    rounds: int = 20,
) -> dict:
    import numpy as np
    import onnx

    from benchmarks._common import markdown_table, write_results
    from onnxforge.converters import ExportConfig, export
    from onnxforge.model_cost import count_params_and_macs
    from onnxforge.model_io import input_specs, load_model
    from onnxforge.pipeline.calibration import load_samples
    from onnxforge.pipeline.prune.channels import ChannelPruneConfig, Repair, prune_model
    from onnxforge.pipeline.prune.low_rank import LowRankConfig, RankRule, factorize_model
    from onnxforge.pipeline.prune.repair import repair_model
    from onnxforge.targets import CpuTarget
    from onnxforge.targets.latency import compare_latency

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import minilm_export  # the wrapper (mean pooling + L2 normalize) and the offline tokenizer

    info: dict[str, dict] = {}
    models: dict[str, onnx.ModelProto] = {}
    with tempfile.TemporaryDirectory(prefix="bench-prune-minilm-") as tmp:
        tmp = Path(tmp)
        fp32_path = tmp / "minilm.onnx"
        export(f"{Path(minilm_export.__file__).resolve()}:build", fp32_path, ExportConfig(
            dynamic_batch=True, dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}))
        _, tokenizer, _ = minilm_export.load()

        def tokens(sentences, length=None):
            padding = "max_length" if length else True
            batch = tokenizer(
                sentences, padding=padding, truncation=True, max_length=length or 512, return_tensors="np"
            )
            return {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

        calib_path = tmp / "calibration.npz"
        np.savez(calib_path, **tokens(CALIBRATION_SENTENCES))
        evaluation = tokens(EVALUATION_SENTENCES)
        timed = tokens(EVALUATION_SENTENCES[:32], seq_len)
        fp32 = load_model(fp32_path)
        calibration = load_samples(calib_path, input_specs(fp32))
        target = CpuTarget()

        def embed(model: onnx.ModelProto) -> np.ndarray:
            session = target.session(model.SerializeToString(), threads=threads)
            return np.concatenate([session.run(None, {k: v[i : i + 32] for k, v in evaluation.items()})[0]
                                   for i in range(0, len(EVALUATION_SENTENCES), 32)])

        reference = embed(fp32)
        params0, macs0 = count_params_and_macs(fp32)
        models["fp32"] = fp32

        def record(name: str, model: onnx.ModelProto, **extra) -> None:
            params, macs = count_params_and_macs(model)
            cosine = _embeddings_cosine(reference, embed(model))
            info[name] = {"params": params, "macs_per_token": macs, "params_ratio": params0 / params,
                          "macs_ratio": macs0 / macs, "cos_min": float(cosine.min()), "cos_mean": float(cosine.mean()),
                          **extra}
            models[name] = model

        record("fp32", fp32)
        for ratio in ffn_ratios:
            config = ChannelPruneConfig(ratio=ratio, repair=Repair.LEAST_SQUARES, calibration_data=calib_path,
                                        calibration_samples=len(CALIBRATION_SENTENCES))
            pruned = prune_model(fp32, config, calibration)
            unrepaired = _embeddings_cosine(reference, embed(pruned.model))
            repaired, errors = repair_model(fp32, pruned, calibration, config)
            refit = [e for e in errors.values() if "after" in e]
            record(f"ffn {ratio:g} + repair", repaired, pruned_layers=pruned.pruned_layers,
                   cos_min_without_repair=float(unrepaired.min()), cos_mean_without_repair=float(unrepaired.mean()),
                   repair_errors=errors,
                   repair_error_mean={"before": float(np.mean([e["before"] for e in refit])),
                                      "after": float(np.mean([e["after"] for e in refit]))} if refit else None)
        low_rank_configs = [(f"low-rank energy {e:g}", LowRankConfig(rule=RankRule.ENERGY, energy=e, min_params=1))
                            for e in energies]
        low_rank_configs += [(f"low-rank ratio {r:g}", LowRankConfig(rule=RankRule.RATIO, ratio=r, min_params=1))
                             for r in rank_ratios]
        for name, config in low_rank_configs:
            model, factored, skipped = factorize_model(fp32, config, calibration)
            record(name, model, factored_layers=len(factored), skipped_layers=len(skipped),
                   ranks=sorted({v["rank"] for v in factored.values()}))

        for batch in (1, 32):
            feeds = {k: np.ascontiguousarray(v[:batch]) for k, v in timed.items()}
            sessions = {name: target.session(m.SerializeToString(), threads=threads) for name, m in models.items()}
            stats = compare_latency(sessions, feeds, rounds=rounds if batch == 1 else max(5, rounds // 3))
            for name in models:
                info[name][f"speedup_b{batch}"] = stats["fp32"].p50_ms / stats[name].p50_ms
                info[name][f"p50_ms_b{batch}"] = stats[name].p50_ms

    headers = ["model", "params x", "MACs x", "speedup b1", "speedup b32", "cos min", "cos mean",
               "cos min / mean no repair", "p50 ms b1", "p50 ms b32"]
    rows = []
    for name, v in info.items():
        no_repair = "-"
        if "cos_min_without_repair" in v:
            no_repair = f"{v['cos_min_without_repair']:.4f} / {v['cos_mean_without_repair']:.4f}"
        if "factored_layers" in v:
            name = f"{name} ({v['factored_layers']} layers)"
        rows.append([name, f"{v['params_ratio']:.2f}", f"{v['macs_ratio']:.2f}", f"{v['speedup_b1']:.2f}",
                     f"{v['speedup_b32']:.2f}", f"{v['cos_min']:.4f}", f"{v['cos_mean']:.4f}", no_repair,
                     f"{v['p50_ms_b1']:.2f}", f"{v['p50_ms_b32']:.1f}"])
    table = markdown_table(headers, rows)
    print(f"### Pruning all-MiniLM-L6-v2 (seq {seq_len}, {len(CALIBRATION_SENTENCES)} calibration / "
          f"{len(EVALUATION_SENTENCES)} evaluation sentences; speedup = fp32 p50 / model p50, interleaved, "
          f"threads={threads or 'default'})\n")
    print(table)
    payload = {"ffn_ratios": list(ffn_ratios), "energies": list(energies), "rank_ratios": list(rank_ratios),
               "seq_len": seq_len, "threads": threads, "results": info, "table": table}
    path = write_results("prune_minilm", payload)
    print(f"\nwritten {path}")
    return info


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ffn-ratios", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    parser.add_argument("--energies", type=float, nargs="+", default=[0.99, 0.999])
    parser.add_argument("--rank-ratios", type=float, nargs="*", default=[0.75])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    run(tuple(args.ffn_ratios), tuple(args.energies), tuple(args.rank_ratios), args.seq_len, args.threads, args.rounds)
