#!/usr/bin/env python3
"""One target topic deleted mid-run while an ordinary client schedules to ten.

Produces RATE records/s for SECONDS with Python's confluent-kafka at its default settings to the
ingest topic, spread evenly over TARGETS target topics, each due DELAY after produce; with
--delete-after S, deletes the first target S seconds in and polls the scheduler's /healthz until it
names that topic. Afterwards reads every target and the DLQ from the beginning and prints one JSON
line: the healthy targets' on-arrival lateness percentiles (arrival - due), and for the deleted one
how many records were delivered, dead-lettered (by sm-error) or missing; early and missing counts
for the healthy ones; and how long after the deletion /healthz first named the deleted topic.

Used by `cargo bench -p messenger --bench compare -- --only isolation`.
"""

import argparse
import json
import threading
import time
import urllib.request
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

# Beside this script: the same consumer settings, topic creation and percentiles.
from steady_client import Reader, create_topics, now_ms, percentile


def scan(bootstrap, topic, partitions):
    """Every record of `topic` now: (body, headers) pairs, read to the high watermarks."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "scan-" + uuid.uuid4().hex[:8]})
    out = []
    try:
        ends = {}
        for p in range(partitions):
            try:
                _, high = c.get_watermark_offsets(TopicPartition(topic, p), 10)
            except Exception:
                high = 0
            ends[p] = high
        c.assign([TopicPartition(topic, p, 0) for p in ends if ends[p] > 0])
        seen = {p: 0 for p in ends}
        deadline = time.time() + 60
        while any(seen[p] < ends[p] for p in ends) and time.time() < deadline:
            for m in c.consume(1000, 0.2):
                if m.error():
                    continue
                seen[m.partition()] = m.offset() + 1
                out.append((json.loads(m.value()), dict(m.headers() or [])))
    finally:
        c.close()
    return out


def healthz_names(http, topic, since, deadline):
    """Seconds after `since` when /healthz first named `topic`, or None before `deadline`."""
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://{http}/healthz", timeout=1) as r:
                body = r.read().decode()
            if topic in body:
                return time.time() - since
        except OSError:
            pass
        time.sleep(0.1)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--ingest", required=True)
    ap.add_argument("--dlq", required=True)
    ap.add_argument("--http", required=True, help="the scheduler's HTTP address")
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--delay-ms", type=int, default=2000)
    ap.add_argument("--targets", type=int, default=10)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--delete-after", type=float, default=0, help="0: delete nothing")
    ap.add_argument("--settle-s", type=float, default=60)
    args = ap.parse_args()

    run = uuid.uuid4().hex[:8]
    targets = [f"iso-{run}-{n}" for n in range(args.targets)]
    create_topics(args.bootstrap, targets, args.partitions)
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    # The deleted target too, while it exists: what it took before the deletion went with it.
    reader = Reader(args.bootstrap, targets, args.partitions)
    reader.start()

    producer = Producer({"bootstrap.servers": args.bootstrap})
    total = int(args.rate * args.seconds)
    started = time.time()
    deleted_at = None
    named = {}
    for i in range(total):
        leave_at = started + i / args.rate
        while (wait := leave_at - time.time()) > 0:
            producer.poll(wait)
        if args.delete_after and deleted_at is None and time.time() - started >= args.delete_after:
            admin.delete_topics([targets[0]])[targets[0]].result(30)
            deleted_at = time.time()
            watcher = threading.Thread(
                target=lambda: named.setdefault(
                    "s", healthz_names(args.http, targets[0], deleted_at, deleted_at + 60)
                ),
                daemon=True,
            )
            watcher.start()
        t = now_ms()
        due = t + args.delay_ms
        target = targets[i % args.targets]
        headers = [("time", str(int(due)).encode()), ("topic", target.encode())]
        value = json.dumps({"i": i, "due": due, "pad": "x" * 120}).encode()
        while True:
            try:
                producer.produce(args.ingest, value, str(i).encode(), headers=headers)
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(60)
    achieved = total / (time.time() - started)

    expected = {i for i in range(total) if i % args.targets != 0 or not args.delete_after}
    deadline = time.time() + args.settle_s
    while time.time() < deadline and not expected.issubset(reader.arrivals.keys()):
        time.sleep(0.2)
    time.sleep(1)
    reader.stop.set()
    reader.join()
    if args.delete_after:
        watcher.join(timeout=60)

    late = sorted(v[0] for i, v in reader.arrivals.items() if i in expected)
    figures = {
        "offered": args.rate,
        "achieved": round(achieved),
        "healthy_p50": percentile(late, 0.50),
        "healthy_p99": percentile(late, 0.99),
        "healthy_max": late[-1] if late else None,
        "healthy_missing": len(expected - reader.arrivals.keys()),
        "healthy_early": sum(1 for x in late if x < 0),
    }
    if args.delete_after:
        dead = {i for i in range(total) if i % args.targets == 0}
        # The deleted target's records may wait for the scheduler's give-up time (30 s) before
        # the DLQ: look again until each is delivered or dead-lettered, or the deadline.
        deadline = time.time() + args.settle_s
        while True:
            delivered = {b["i"] for b, _ in scan(args.bootstrap, targets[0], args.partitions)}
            delivered |= dead & reader.arrivals.keys()
            dlq = {}
            for body, headers in scan(args.bootstrap, args.dlq, 16):
                if body.get("i") in dead:
                    reason = (headers.get("sm-error") or b"?").decode()
                    dlq.setdefault(reason, set()).add(body["i"])
            in_dlq = set().union(*dlq.values()) if dlq else set()
            if not dead - delivered - in_dlq or time.time() > deadline:
                break
            time.sleep(2)
        figures.update(
            {
                "dead_records": len(dead),
                "dead_delivered": len(delivered & dead),
                "dead_dlq": {k: len(v) for k, v in sorted(dlq.items())},
                "dead_missing": len(dead - delivered - in_dlq),
                "named_after_s": None if named.get("s") is None else round(named["s"], 1),
            }
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
