"""Reads a topic with kafka-python as an outside consumer would, printing one JSON line per message.

Usage: python3 read_topic.py BROKERS TOPIC GROUP EXPECTED TIMEOUT_SECONDS
Stops once EXPECTED distinct message_id headers were seen, or after TIMEOUT_SECONDS.
"""
import json
import sys
import time

from kafka import KafkaConsumer

brokers, topic, group, expected, timeout = sys.argv[1:6]
expected, deadline = int(expected), time.monotonic() + float(timeout)
consumer = KafkaConsumer(
    topic,
    bootstrap_servers=brokers,
    group_id=group,
    auto_offset_reset="earliest",
    enable_auto_commit=True,
)
seen = set()
while len(seen) < expected and time.monotonic() < deadline:
    for batch in consumer.poll(timeout_ms=500).values():
        for m in batch:
            headers = {k: v.decode("utf-8") for k, v in m.headers}
            seen.add(headers.get("message_id"))
            print(json.dumps({
                "partition": m.partition,
                "offset": m.offset,
                "key": m.key.decode("utf-8") if m.key is not None else None,
                "value": m.value.decode("utf-8"),
                "headers": headers,
                "timestamp": m.timestamp,
            }), flush=True)
consumer.close()
