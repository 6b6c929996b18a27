#!/usr/bin/env python3
"""Scrapes a Prometheus endpoint and parses it with the official Python client's text parser
(prometheus_client from PyPI, installed by .ci/install-deps): prints one JSON object, the
samples as [name, labels, value], or exits 1 with the parser's error. Used by MetricsTests."""
import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

url = sys.argv[1]
with urllib.request.urlopen(url, timeout=5) as response:
    content_type = response.headers.get("Content-Type", "")
    text = response.read().decode("utf-8")
try:
    families = list(text_string_to_metric_families(text))
except Exception as error:  # the parser's own error: the text is not valid exposition format
    print("parse error: %s\n%s" % (error, text), file=sys.stderr)
    sys.exit(1)
samples = []
types = {}
for family in families:
    types[family.name] = family.type
    for sample in family.samples:
        samples.append([sample.name, sample.labels, sample.value])
print(json.dumps({"content_type": content_type, "types": types, "samples": samples}))
