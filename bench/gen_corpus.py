"""Writes a synthetic fortune-format corpus of N records (RU and EN words, attributions),
deterministically, for ingest's throughput and memory benchmark.

    python3 bench/gen_corpus.py N OUT_FILE
"""
import random, sys

EN = "the of and to in is you that it he was for on are as with his they at be this have from or one had by word but not what all were we when your can said".split()
RU = "и в не на я быть он с что а по это она этот к но они мы как из у который то за свой весь год от так о для ты же".split()
AUTHORS = [f"Author {i}" for i in range(500)] + [f"Автор {i}" for i in range(500)]

def main():
    n, out = int(sys.argv[1]), sys.argv[2]
    rng = random.Random(42)
    with open(out, "w", encoding="utf-8") as f:
        for i in range(n):
            words = RU if i % 2 else EN
            k = rng.randint(8, 30)
            body = " ".join(rng.choice(words) for _ in range(k))
            f.write(f"{body} {i}.\n")
            if rng.random() < 0.7:
                f.write(f"\t\t-- {rng.choice(AUTHORS)}\n")
            f.write("%\n")

main()
