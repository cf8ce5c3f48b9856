// The fast path benchmark's cheap ends (crates/kyuu-bench/src/bin/kyuu-fastpath-bench.rs), so the
// benchmark measures the relay and not its load generator. Built by crates/kyuu-bench/build.rs
// with `clang -target bpf -O2`; attached in generic XDP mode.
//
// `bench_world` sits on the world side of the veth to the server, where the client and the peer
// addresses live:
//   - a UDP datagram to the peer address is reflected (MACs, addresses and ports swapped,
//     XDP_TX): the echo peer costs one XDP run, no socket, no thread;
//   - ChannelData to the client address is counted and dropped: its first 8 payload bytes after
//     the 4-byte ChannelData header are the sender's CLOCK_MONOTONIC nanoseconds, so the round
//     trip time goes into a histogram here (1 µs buckets below 1 ms, 1 ms buckets above);
//     (a UDP GSO packet counts as the datagrams it carries, each with the first one's stamp);
//   - with BINDING set (the `binding` workload), a STUN Binding success response (or, for the
//     null run's mirror, the request itself) to the client address is counted and dropped, its
//     round trip time taken from the CLOCK_MONOTONIC stamp in the transaction id's first 8 bytes;
//   - anything else (ARP, STUN answers during setup) goes up the stack.
// `bench_mirror` sits on the server side instead of a relay (the "no relay" calibration): any
// UDP datagram to the server address is reflected at once, so the harness cost per round trip
// (generator, veth crossings, the two XDP ends) can be measured and subtracted.
//
// Swapping source and destination changes neither the IPv4 header checksum nor the UDP
// checksum (both are sums over the swapped words), so no checksum is touched.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define HIST_US 1024
#define HIST_MS 2048
#define HIST (HIST_US + HIST_MS)

// Counter indexes.
#define C_REFLECTED 0
#define C_RECEIVED 1
#define C_PASSED 2
#define C_LATE 3
#define C_GSO 4
#define COUNTERS 5

// Addresses (network order), set by the loader before the program is verified.
const volatile __be32 CLIENT_IP = 0;
const volatile __be32 PEER_IP = 0;
const volatile __be32 SERVER_IP = 0;
// Payload bytes of each datagram the generator sends (the segment size of a GSO packet to the
// peer).
const volatile __u32 PEER_SEG = 0;
// The binding workload: count STUN Binding answers to the client instead of ChannelData.
const volatile __u32 BINDING = 0;

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, COUNTERS);
    __type(key, __u32);
    __type(value, __u64);
} BENCH_COUNTERS SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, HIST);
    __type(key, __u32);
    __type(value, __u64);
} BENCH_HIST SEC(".maps");

static __always_inline void add(__u32 map_index, __u64 n)
{
    __u64 *c = bpf_map_lookup_elem(&BENCH_COUNTERS, &map_index);
    if (c)
        *c += n;
}

static __always_inline void bump(__u32 map_index) { add(map_index, 1); }

// Datagrams in one packet of `seg`-byte segments: a relay that sends with UDP GSO (kyuu's
// userspace path) puts many datagrams for one destination in one packet, and veth carries it
// whole (generic XDP sees it linearised); a real NIC would segment it on the way out.
static __always_inline __u32 segments(__u8 *payload, void *end, __u32 seg)
{
    __u32 avail = (__u32)((long)end - (long)payload);
    if (seg == 0 || avail < 2 * seg)
        return 1;
    if (avail > 65535)
        avail = 65535;
    __u32 n = avail / seg;
    add(C_GSO, 1);
    return n;
}

// Swaps MACs, IPv4 addresses and UDP ports in place.
static __always_inline int reflect(struct ethhdr *eth, struct iphdr *ip, struct udphdr *udp,
                                   __u32 n)
{
    __u8 mac[ETH_ALEN];
    __builtin_memcpy(mac, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
    __be32 a = ip->saddr;
    ip->saddr = ip->daddr;
    ip->daddr = a;
    __be16 p = udp->source;
    udp->source = udp->dest;
    udp->dest = p;
    add(C_REFLECTED, n);
    return XDP_TX;
}

// Counts `n` datagrams sent at `sent` and received at `now` (CLOCK_MONOTONIC ns) in the round
// trip histogram; a missing or future stamp counts as late, in the last bucket.
static __always_inline void received(__u64 sent, __u64 now, __u32 n)
{
    __u32 bucket;
    if (sent == 0 || sent > now) {
        bump(C_LATE);
        bucket = HIST - 1;
    } else {
        __u64 us = (now - sent) / 1000;
        if (us < HIST_US)
            bucket = us;
        else if (us / 1000 < HIST_MS - 1)
            bucket = HIST_US + us / 1000;
        else
            bucket = HIST - 1;
    }
    __u64 *h = bpf_map_lookup_elem(&BENCH_HIST, &bucket);
    if (h)
        *h += n;
    add(C_RECEIVED, n);
}

struct parsed {
    struct ethhdr *eth;
    struct iphdr *ip;
    struct udphdr *udp;
    __u8 *payload;
};

static __always_inline int parse(struct xdp_md *ctx, struct parsed *p)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    p->eth = data;
    if ((void *)(p->eth + 1) > end || p->eth->h_proto != bpf_htons(ETH_P_IP))
        return -1;
    p->ip = (void *)(p->eth + 1);
    if ((void *)(p->ip + 1) > end || p->ip->ihl != 5 || p->ip->protocol != IPPROTO_UDP)
        return -1;
    p->udp = (void *)(p->ip + 1);
    if ((void *)(p->udp + 1) > end)
        return -1;
    p->payload = (void *)(p->udp + 1);
    return 0;
}

SEC("xdp")
int bench_world(struct xdp_md *ctx)
{
    void *end = (void *)(long)ctx->data_end;
    struct parsed p;
    if (parse(ctx, &p))
        return XDP_PASS;
    if (p.ip->daddr == PEER_IP)
        return reflect(p.eth, p.ip, p.udp, segments(p.payload, end, PEER_SEG));
    if (BINDING && p.ip->daddr == CLIENT_IP && p.payload + 20 <= (__u8 *)end &&
        (p.payload[0] == 0x01 || p.payload[0] == 0x00) && p.payload[1] == 0x01 &&
        p.payload[4] == 0x21 && p.payload[5] == 0x12 && p.payload[6] == 0xa4 &&
        p.payload[7] == 0x42) {
        __u64 sent;
        __builtin_memcpy(&sent, p.payload + 8, 8);
        received(sent, bpf_ktime_get_ns(), 1);
        return XDP_DROP;
    }
    if (p.ip->daddr != CLIENT_IP || p.payload + 12 > (__u8 *)end || (p.payload[0] & 0xc0) != 0x40) {
        bump(C_PASSED);
        return XDP_PASS;
    }
    __u64 sent;
    __builtin_memcpy(&sent, p.payload + 4, 8);
    __u64 now = bpf_ktime_get_ns();
    __u32 seg = 4 + (((__u32)p.payload[2] << 8) | p.payload[3]);
    received(sent, now, segments(p.payload, end, seg));
    return XDP_DROP;
}

SEC("xdp")
int bench_mirror(struct xdp_md *ctx)
{
    struct parsed p;
    if (parse(ctx, &p) || p.ip->daddr != SERVER_IP)
        return XDP_PASS;
    return reflect(p.eth, p.ip, p.udp, 1);
}
