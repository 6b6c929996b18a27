# The rule lists for bench/compare.sh's rules rows, the same lists in each proxy's syntax.
#   python3 make-rules.py DIR RULES GEO_ENTRIES
# Writes into DIR:
#   acl.inc        RULES allow/deny lines for nginx and Portcullis (first match wins): a mix of
#                  deny 10.a.b.0/24, allow 172.16-31.x.y and deny 2001:db8:x:y::/64, none of
#                  which matches the client (127.0.0.1); the last line, `allow all;`, is the
#                  client's match, so a linear scanner walks every line for every connection
#   allow.acl, deny.acl
#                  the same networks for HAProxy (`tcp-request connection accept if { src -f
#                  allow.acl }`, then `reject if { src -f deny.acl }`): equivalent to the list
#                  above because no allow network overlaps a deny network
#   geo.inc        GEO_ENTRIES entries of a `geo` block (networks in 10.0.0.0/8, prefixes 16-32,
#                  250 values), the client's own 127.0.0.0/8 last
#   geo.map        the same entries for HAProxy's map_ip
import os
import random
import sys

out, rules, geo_entries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(7)

acl, allow, deny = [], [], []
seen = set()
while len(acl) < rules - 1:
    kind = len(acl) % 3
    if kind == 0:
        net = "10.%d.%d.0/24" % (random.randrange(256), random.randrange(256))
    elif kind == 1:
        net = "172.%d.%d.%d" % (random.randrange(16, 32), random.randrange(256), random.randrange(256))
    else:
        net = "2001:db8:%x:%x::/64" % (random.randrange(65536), random.randrange(65536))
    if net in seen:
        continue
    seen.add(net)
    verb = "allow" if kind == 1 else "deny"
    acl.append("%s %s;" % (verb, net))
    (allow if kind == 1 else deny).append(net)
acl.append("allow all;")

geo, seen = [], set()
while len(geo) < geo_entries - 1:
    prefix = random.randrange(16, 33)
    address = (10 << 24) | random.getrandbits(24)
    address &= (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    net = "%d.%d.%d.%d/%d" % (address >> 24, (address >> 16) & 255, (address >> 8) & 255, address & 255, prefix)
    if net in seen:
        continue
    seen.add(net)
    geo.append((net, "g%d" % random.randrange(250)))
geo.append(("127.0.0.0/8", "loopback"))

def write(name, lines):
    with open(os.path.join(out, name), "w") as f:
        f.write("\n".join(lines) + "\n")

write("acl.inc", acl)
write("allow.acl", allow)
write("deny.acl", deny)
write("geo.inc", ["%s %s;" % entry for entry in geo])
write("geo.map", ["%s %s" % entry for entry in geo])
