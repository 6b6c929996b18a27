# The table of bench/compare.sh: reads its samples and prints one table, and writes the same
# table as Markdown.
#   python3 report.py SAMPLES HEADER MARKDOWN_OUT RULES GEO_ENTRIES IDLE_N
# SAMPLES has one line per measurement, "ROW TARGET REP VALUE"; HEADER holds the lines to print
# above the table. Each cell is the median over the repetitions with (min–max); the ratio
# columns divide medians. Derived rows (the latency a hop adds, a rule list's cost) are worked
# out per repetition from runs of the same repetition, then summarised the same way.
import statistics
import sys
from collections import defaultdict

samples_path, header_path, md_path = sys.argv[1], sys.argv[2], sys.argv[3]
rules, geo_entries, idle_n = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])

data = defaultdict(dict)  # (row, target) -> {rep: value}
with open(samples_path) as f:
    for line in f:
        parts = line.split()
        if len(parts) == 4:
            row, target, rep, value = parts
            data[(row, target)][int(rep)] = float(value)

TARGETS = [("direct", "direct loopback"), ("portcullis", "Portcullis"), ("nginx", "nginx stream"), ("haproxy", "HAProxy")]
PROXIES = ["portcullis", "nginx", "haproxy"]

def derive(row, source, how):
    """Per repetition, for each proxy: "added" = source minus direct loopback's source (the
    latency a hop adds); "ratio" = source / the same proxy's "conn" (a rule list's cost)."""
    for target in PROXIES:
        base_row, base_target = (source, "direct") if how == "added" else ("conn", target)
        a, b = data.get((source, target), {}), data.get((base_row, base_target), {})
        for rep in a:
            if rep in b and (how == "added" or b[rep] > 0):
                data[(row, target)][rep] = a[rep] - b[rep] if how == "added" else a[rep] / b[rep]

derive("add50", "p50", "added")
derive("add99", "p99", "added")
derive("aclx", "acl", "ratio")
derive("geox", "geo", "ratio")
derive("heldx", "connheld", "ratio")

# (row, label, has a direct-loopback line, has ratio columns)
ROWS = [
    ("tcp1", "TCP throughput, 1 stream, Gbit/s", True, True),
    ("tcp8", "TCP throughput, 8 streams, Gbit/s", True, True),
    ("cpugb1", "proxy CPU-seconds per GB, 1 stream (lower is better)", False, True),
    ("cpugb8", "proxy CPU-seconds per GB, 8 streams (lower is better)", False, True),
    ("conn", "new connections/s (HTTP, Connection: close)", True, True),
    ("cpuconn", "proxy CPU µs per connection (lower is better)", False, True),
    ("conn64", "new connections/s, wrk -c64", True, True),
    ("cpuconn64", "proxy CPU µs per connection, -c64 (lower is better)", False, True),
    ("connheld", "new connections/s with %s idle connections held" % format(idle_n, ","), False, True),
    ("heldx", "  × the same proxy without them", False, False),
    ("cpuheld", "proxy CPU µs per connection, idle connections held (lower is better)", False, True),
    ("p50", "keep-alive latency p50, µs, 1 connection (lower is better)", True, True),
    ("add50", "  added by the hop, p50, µs", False, False),
    ("p99", "keep-alive latency p99, µs (lower is better)", True, True),
    ("add99", "  added by the hop, p99, µs", False, False),
    ("udp", "UDP 64-byte datagrams/s delivered", True, True),
    ("mem", "memory per idle connection, bytes of PSS (lower is better)", False, True),
    ("acl", "new connections/s, %s allow/deny rules" % format(rules, ","), False, True),
    ("aclx", "  × the same proxy without rules", False, False),
    ("geo", "new connections/s, %s-entry geo in the log" % format(geo_entries, ","), False, True),
    ("geox", "  × the same proxy without geo", False, False),
]
NOT_APPLICABLE = {("udp", "haproxy"): "n/a (no UDP proxy in 2.6)"}

def number(v, row):
    if row in ("aclx", "geox", "heldx"):
        return "%.2f" % v
    a = abs(v)
    if a >= 1000:
        return format(round(v), ",")
    if a >= 100:
        return "%.0f" % v
    if a >= 10:
        return "%.1f" % v
    return "%.2f" % v

def median(row, target):
    values = list(data.get((row, target), {}).values())
    return statistics.median(values) if values else None

def cell(row, target):
    values = list(data.get((row, target), {}).values())
    if not values:
        return NOT_APPLICABLE.get((row, target), "—")
    m = statistics.median(values)
    low, high = number(min(values), row), number(max(values), row)
    text = "%s (%s %s %s)" % (number(m, row), low, "to" if min(values) < 0 else "–", high)
    text = text.replace(" – ", "–")
    if row == "mem":
        text += " = %.2f KiB" % (m / 1024)
    if row in ("add50", "add99") and m >= 0:
        text = "+" + text
    return text

def ratio(a, b):
    return "%.2f" % (a / b) if a is not None and b not in (None, 0) else "—"

table = []
for row, label, direct, ratios in ROWS:
    if not any((row, t) in data for t, _ in TARGETS):
        continue
    for target, name in TARGETS:
        if target == "direct" and not direct:
            continue
        m = median(row, target)
        if ratios:
            r = [ratio(m, median(row, "direct")) if direct else "—",
                 ratio(m, median(row, "nginx")), ratio(m, median(row, "haproxy"))]
        else:
            r = ["—", "—", "—"]
        table.append([label, name, cell(row, target)] + r)
        label = ""

HEAD = ["measurement", "path", "median (min–max)", "× direct", "× nginx", "× HAProxy"]
with open(header_path) as f:
    header = [line.rstrip("\n") for line in f]

widths = [max(len(r[i]) for r in table + [HEAD]) for i in range(len(HEAD))]
for line in header:
    print(line)
print()
print("  ".join(h.ljust(w) for h, w in zip(HEAD, widths)))
print("  ".join("-" * w for w in widths))
previous = None
for r in table:
    if r[0] and previous is not None:
        print()
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    previous = r

with open(md_path, "w") as f:
    f.write("# Portcullis, nginx and HAProxy compared (`bash bench/compare.sh`)\n\n")
    for line in header:
        f.write(line + "  \n" if line else "\n")
    f.write("\n| " + " | ".join(HEAD) + " |\n")
    f.write("|" + "---|" * len(HEAD) + "\n")
    for r in table:
        cells = [r[0].strip(), "**%s**" % r[1] if r[1] == "Portcullis" else r[1]] + r[2:]
        f.write("| " + " | ".join(cells) + " |\n")
