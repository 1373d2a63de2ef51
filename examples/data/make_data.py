"""Generates the demo's strict-JSON extraction data set: `train.jsonl` (400) and `valid.jsonl` (50).

Each example is a chat: a short system prompt stating the schema, a free-text payment request (one of many
phrasings, with a name, a date in one of several surface formats, an amount written with a currency symbol, code
or word, and a city), and the assistant's answer: ONLY a compact JSON object with exactly these fields, in this
order:

    {"name":"Ana Silva","date":"2025-03-07","amount":1250.50,"city":"Lisbon"}

Normalization the model must learn: dates -> YYYY-MM-DD; amounts -> a plain JSON number (currency and thousands
separators dropped; cents kept as written, whole amounts as integers). Names and cities are copied verbatim.
The answer is compact (no spaces) and has no currency field to keep examples short: about 100 SmolLM2 tokens
with the chat template and system prompt, about 33 of them the answer (digits are single tokens), so that a few
minutes of CPU LoRA training can learn the format.

Deterministic: pure Python with a fixed seed, so re-running rewrites byte-identical files.
Run: `python examples/data/make_data.py [--out DIR] [--seed N]`.
"""

import argparse
import json
import os
import random

SYSTEM = "Reply with JSON only: name, date (YYYY-MM-DD), amount, city."
N_TRAIN, N_VALID = 400, 50

FIRST = ["Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "James", "Kenji", "Laura",
         "Marco", "Nadia", "Oliver", "Priya", "Quinn", "Rosa", "Samuel", "Tara", "Umar", "Vera", "Wei", "Yara",
         "Zoe", "Lucas", "Mia", "Noah", "Sofia", "Leo", "Amara", "Jonas", "Maya", "Omar", "Hana", "Ivan"]
LAST = ["Silva", "Schmidt", "Dubois", "Rossi", "Novak", "Kim", "Tanaka", "Garcia", "Okafor", "Jensen", "Patel",
        "Murphy", "Costa", "Weber", "Lindqvist", "Haddad", "Moreau", "Kowalski", "Brown", "Nguyen", "Fischer",
        "Lopez", "Ivanova", "Sato", "Mensah", "Olsen", "Romano", "Chen", "Walsh", "Berg"]
CITIES = ["Lisbon", "Berlin", "Paris", "Rome", "Prague", "Seoul", "Osaka", "Madrid", "Lagos", "Oslo", "Mumbai",
          "Dublin", "Porto", "Vienna", "Stockholm", "Beirut", "Lyon", "Warsaw", "Boston", "Hanoi", "Munich",
          "Toronto", "Cairo", "Nairobi", "Zurich", "Athens", "New York", "San Diego", "Cape Town", "Buenos Aires",
          "Hong Kong", "Rio de Janeiro"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def ordinal(d: int) -> str:
    return f"{d}{'th' if 10 <= d % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d % 10, 'th')}"


DATE_FORMATS = [
    lambda y, m, d: f"{MONTHS[m - 1]} {d}, {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"{MONTHS[m - 1][:3]} {d}, {y}",
    lambda y, m, d: f"{y}-{m:02d}-{d:02d}",
    lambda y, m, d: f"the {ordinal(d)} of {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"{MONTHS[m - 1]} {ordinal(d)} {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1][:3]} {y}",
]


def _number(whole: int, cents: int, thousands: bool) -> str:
    w = f"{whole:,}" if thousands else str(whole)
    return w if cents < 0 else f"{w}.{cents:02d}"


# Currency surface forms, per ISO code: a function (number text) -> text in the request.
CURRENCIES = {
    "USD": [lambda n: f"${n}", lambda n: f"{n} USD", lambda n: f"{n} dollars", lambda n: f"USD {n}"],
    "EUR": [lambda n: f"€{n}", lambda n: f"{n} EUR", lambda n: f"{n} euros", lambda n: f"{n}€"],
    "GBP": [lambda n: f"£{n}", lambda n: f"{n} GBP", lambda n: f"{n} pounds"],
    "CHF": [lambda n: f"CHF {n}", lambda n: f"{n} Swiss francs", lambda n: f"{n} CHF"],
}

TEMPLATES = [
    "Please send {amount} to {name} in {city} on {date}.",
    "{name} from {city} paid {amount} on {date}.",
    "Refund {amount} to {name} ({city}), dated {date}.",
    "Invoice: {name}, {city}, {amount}, due {date}.",
    "On {date}, {name} spent {amount} in {city}.",
    "Log an expense of {amount} for {name}: hotel in {city}, {date}.",
    "Can you book {amount} for {name}'s trip to {city} on {date}?",
    "{city}, {date}: {name} transferred {amount}.",
    "Reimburse {name} {amount} for the {city} conference ({date}).",
    "hi, {name} still owes us {amount} since {date}, they live in {city}",
    "Record a donation of {amount} from {name} of {city}, received {date}.",
    "Schedule a payment of {amount} to {name} ({city}) for {date}.",
    "{name} - {amount} - {city} - {date}",
    "Charge {name} {amount} for the order shipped to {city} on {date}.",
]


def example(rng: random.Random) -> tuple[str, str]:
    """One (request, answer) pair."""
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    city = rng.choice(CITIES)
    y, m, d = rng.randint(2023, 2026), rng.randint(1, 12), rng.randint(1, 28)
    code = rng.choice(sorted(CURRENCIES))
    whole = rng.choice([rng.randint(5, 99), rng.randint(100, 999), rng.randint(1000, 9999)])
    cents = -1 if rng.random() < 0.5 else rng.randint(1, 99)
    surface = rng.choice(CURRENCIES[code])(_number(whole, cents, thousands=rng.random() < 0.5))
    request = rng.choice(TEMPLATES).format(
        name=name, city=city, date=rng.choice(DATE_FORMATS)(y, m, d), amount=surface)
    # Built by hand so the amount keeps its digits as written (1250.50, not json's 1250.5); still strict JSON.
    answer = (f'{{"name":{json.dumps(name)},"date":"{y}-{m:02d}-{d:02d}","amount":{_number(whole, cents, False)},'
              f'"city":{json.dumps(city)}}}')
    json.loads(answer)  # always valid
    return request, answer


def generate(seed: int = 0, n: int = N_TRAIN + N_VALID) -> list[dict]:
    """``n`` chat records with distinct requests."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        request, answer = example(rng)
        if request in seen:
            continue
        seen.add(request)
        out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": request},
                                 {"role": "assistant", "content": answer}]})
    return out


def write(records: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = generate(args.seed)
    os.makedirs(args.out, exist_ok=True)
    write(records[:N_TRAIN], os.path.join(args.out, "train.jsonl"))
    write(records[N_TRAIN:], os.path.join(args.out, "valid.jsonl"))
    print(f"wrote {N_TRAIN} train and {len(records) - N_TRAIN} valid examples to {args.out}")


if __name__ == "__main__":
    main()
