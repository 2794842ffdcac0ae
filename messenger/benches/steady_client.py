#!/usr/bin/env python3
"""An ordinary Kafka client at a steady rate, as a user meets the scheduler.

Produces RATE records/s for SECONDS with Python's confluent-kafka at its default settings and reads
them where they arrive (a reader at default settings too), then prints one JSON line:
offered and achieved rate, lateness percentiles on arrival, early/missing/duplicate counts, and the
CPU seconds the broker process used during the run (when --broker-pid is given).

Modes (the same producer and reader in each, so the figures compare):
  broker     produce to a plain topic; lateness = arrival - produce time (the broker alone)
  relay      produce to a plain topic that a relay process (consume, then produce with
             idempotence and acks=all, one hop) copies to the target: the control for one hop
  scheduler  produce to the ingest topic with headers time=now+DELAY and topic=TARGET; the
             scheduler under test, running beside, delivers; lateness = arrival - due time

Used by `cargo bench -p messenger --bench compare -- --only client` and by hand:
  steady_client.py --bootstrap 127.0.0.1:9092 --mode scheduler --rate 1000 --seconds 10
"""

import argparse
import json
import os
import sys
import threading
import time
import uuid

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def now_ms():
    return time.time() * 1000.0


def cpu_seconds(pid):
    """utime + stime of a process, from /proc (clock ticks to seconds)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def create_topics(bootstrap, names, partitions):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
    )
    for name, fut in futures.items():
        try:
            fut.result(30)
        except KafkaException as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise


def consumer(bootstrap, role, settings=None):
    """A consumer at default settings but for a group of its own, reading from the beginning."""
    config = {
        "bootstrap.servers": bootstrap,
        "group.id": f"steady-{role}-" + uuid.uuid4().hex[:8],
        "auto.offset.reset": "earliest",
    }
    config.update(settings or {})
    return Consumer(config)


class Reader(threading.Thread):
    """Reads the target topics from their beginning and stamps each record's arrival."""

    def __init__(self, bootstrap, topics, partitions):
        super().__init__(daemon=True)
        self.consumer = consumer(bootstrap, "reader", {"enable.auto.commit": False})
        self.consumer.assign(
            [TopicPartition(t, p, 0) for t in topics for p in range(partitions)]
        )
        self.arrivals = {}  # index -> [lateness ms, ...]
        self.stop = threading.Event()
        self.last_arrival = time.time()

    def run(self):
        while not self.stop.is_set():
            msgs = self.consumer.consume(1000, 0.05)
            t = now_ms()
            for m in msgs:
                if m.error():
                    continue
                body = json.loads(m.value())
                self.arrivals.setdefault(body["i"], []).append(t - body["due"])
            if msgs:
                self.last_arrival = time.time()
        self.consumer.close()


class Relay(threading.Thread):
    """Consume, then produce with idempotence and acks=all: one hop, the control."""

    def __init__(self, bootstrap, source, target):
        super().__init__(daemon=True)
        self.consumer = consumer(bootstrap, "relay")
        self.consumer.subscribe([source])
        self.producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 1,
            }
        )
        self.target = target
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for m in self.consumer.consume(1000, 0.05):
                if m.error():
                    continue
                while True:
                    try:
                        self.producer.produce(
                            self.target, m.value(), m.key(), headers=m.headers()
                        )
                        break
                    except BufferError:
                        self.producer.poll(0.01)
            self.producer.poll(0)
        self.producer.flush(30)
        self.consumer.close()


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))
    return sorted_values[i]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--mode", choices=["broker", "relay", "scheduler"], required=True)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--delay-ms", type=int, default=5000, help="scheduler mode: due this long after produce")
    ap.add_argument("--ingest", default="SCHEDULED_MESSAGES")
    ap.add_argument(
        "--partitions",
        type=int,
        default=16,
        help="of the topics this run creates (16: as many as the ingest topic has by default, so "
        "that the producer and the readers do the same work in every mode)",
    )
    ap.add_argument("--broker-pid", type=int, default=0)
    ap.add_argument("--settle-s", type=float, default=30, help="how long to wait for stragglers")
    args = ap.parse_args()

    run = uuid.uuid4().hex[:8]
    target = f"steady-target-{run}"
    source = f"steady-source-{run}"
    create_topics(args.bootstrap, [target, source], args.partitions)

    reader = Reader(args.bootstrap, [target], args.partitions)
    reader.start()
    relay = None
    if args.mode == "relay":
        relay = Relay(args.bootstrap, source, target)
        relay.start()
    time.sleep(0)  # let the threads start
    producer = Producer({"bootstrap.servers": args.bootstrap})
    acked = [0, None]  # count, time of the last acknowledgement

    def on_ack(err, _msg):
        if err is None:
            acked[0] += 1
            acked[1] = time.time()

    total = int(args.rate * args.seconds)
    cpu0 = cpu_seconds(args.broker_pid)
    started = time.time()
    for i in range(total):
        # Steady pacing: record i leaves at started + i / rate. poll() returns early when it
        # serves a delivery report, so wait in a loop until the time has come.
        leave_at = started + i / args.rate
        while (wait := leave_at - time.time()) > 0:
            producer.poll(wait)
        t = now_ms()
        if args.mode == "scheduler":
            # The due time the header states, in whole milliseconds: measured against the float
            # it was cut from, a record delivered in its due millisecond looked up to 1 ms early.
            due = int(t + args.delay_ms)
            topic = args.ingest
        else:
            due = t
            topic = target if args.mode == "broker" else source
        # The same two headers in every mode, so that each mode writes and reads the same records.
        headers = [("time", str(int(t + args.delay_ms)).encode()), ("topic", target.encode())]
        value = json.dumps({"i": i, "due": due, "pad": "x" * 120}).encode()
        while True:
            try:
                producer.produce(topic, value, str(i).encode(), headers=headers, on_delivery=on_ack)
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(120)
    produce_s = (acked[1] or time.time()) - started
    # Wait until every record arrived, or nothing arrived for settle-s.
    last_due = (started + args.seconds) * 1000 + (args.delay_ms if args.mode == "scheduler" else 0)
    while len(reader.arrivals) < total:
        if now_ms() > last_due and time.time() - reader.last_arrival > args.settle_s:
            break
        time.sleep(0.1)
    # A little longer, so duplicates in flight are counted too.
    time.sleep(0.5)
    cpu1 = cpu_seconds(args.broker_pid)
    elapsed = time.time() - started
    reader.stop.set()
    if relay:
        relay.stop.set()
        relay.join(30)
    reader.join(30)

    firsts = sorted(v[0] for v in reader.arrivals.values())
    dups = sum(len(v) - 1 for v in reader.arrivals.values())
    out = {
        "mode": args.mode,
        "offered_per_s": args.rate,
        "records": total,
        "acked": acked[0],
        "achieved_per_s": round(acked[0] / produce_s, 1) if produce_s > 0 else None,
        "achieved_ratio": round(acked[0] / produce_s / args.rate, 3) if produce_s > 0 else None,
        "p50_ms": percentile(firsts, 0.50),
        "p99_ms": percentile(firsts, 0.99),
        "p999_ms": percentile(firsts, 0.999),
        "max_ms": firsts[-1] if firsts else None,
        "early": sum(1 for v in firsts if v < 0) if args.mode == "scheduler" else 0,
        "missing": total - len(reader.arrivals),
        "duplicates": dups,
        "broker_cpu_s": round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None,
        "elapsed_s": round(elapsed, 2),
    }
    for k in ("p50_ms", "p99_ms", "p999_ms", "max_ms"):
        if out[k] is not None:
            out[k] = round(out[k], 1)
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
