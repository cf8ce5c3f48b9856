// kyuu's kernel fast path for TURN channels (XDP). Built by crates/kyuu-ebpf/build.rs with
// `clang -target bpf -O2`; loaded and fed by crates/kyuu-ebpf/src/lib.rs.
//
// Two directions, both only for UDP clients of UDP allocations with a bound channel, and only
// when the client and the peer use the same address family:
//
//   client ChannelData  -> c2p[client 5-tuple + channel] -> plain UDP datagram relay -> peer
//   peer UDP datagram   -> p2c[peer 5-tuple]             -> ChannelData listener -> client
//
// Userspace is the authority: it installs an entry when a channel is bound and its peer has a
// permission, and removes it when either ends. Everything this program does not recognise or
// cannot handle goes up the stack unchanged (XDP_PASS): STUN, Send/Data indications, TCP,
// fragments, IP options, IPv6 extension headers, packets that would exceed the MTU, unknown
// tuples, expired entries, next hops the kernel has not resolved yet.
//
// Checksums: the UDP checksum is updated incrementally (RFC 1624 arithmetic on 16-bit words in
// memory order), the 20-byte IPv4 header checksum is recomputed (it is ten words).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the checksum arithmetic below assumes a little-endian BPF target (bpfel)"
#endif

#define MAX_ENTRIES 65536
#define AF_INET 2
#define AF_INET6 10
#define TTL 64

// config.flags: swap the MAC addresses instead of asking the FIB (BPF_PROG_TEST_RUN has no
// ingress interface to route from).
#define FLAG_SWAP_MACS 1

struct c2p_key {
    __u8 client_ip[16]; // IPv4 as ::ffff:a.b.c.d
    __u8 server_ip[16];
    __be16 client_port;
    __be16 server_port;
    __be16 channel;
    __u16 _pad;
};

struct c2p_val {
    __u8 relay_ip[16];
    __u8 peer_ip[16];
    __be16 relay_port;
    __be16 peer_port;
    __u32 slot; // index into `counters`
    __u64 expires_ns; // CLOCK_MONOTONIC (bpf_ktime_get_ns)
    __u8 peer_mac[6]; // next hop toward the peer, learned from the peer's datagrams
    __u16 _pad;
};

struct p2c_key {
    __u8 peer_ip[16];
    __u8 relay_ip[16];
    __be16 peer_port;
    __be16 relay_port;
    __u32 _pad;
};

struct p2c_val {
    __u8 client_ip[16];
    __u8 server_ip[16];
    __be16 client_port;
    __be16 server_port;
    __be16 channel;
    __u16 _pad;
    __u32 slot;
    __u32 _pad2;
    __u64 expires_ns;
    __u8 client_mac[6]; // next hop toward the client, learned from its ChannelData
    __u16 _pad3;
};

struct counter {
    __u64 packets;
    __u64 bytes; // payload bytes, as userspace counts them
};

struct config {
    __u32 max_ip_len; // largest IP packet to emit (the interface MTU); 0: 1500
    __u32 flags;
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, MAX_ENTRIES);
    __type(key, struct c2p_key);
    __type(value, struct c2p_val);
} C2P SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, MAX_ENTRIES);
    __type(key, struct p2c_key);
    __type(value, struct p2c_val);
} P2C SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 2 * MAX_ENTRIES);
    __type(key, __u32);
    __type(value, struct counter);
} COUNTERS SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct config);
} CONFIG SEC(".maps");

// Headers of one packet, copied to the stack: rewritten there, written back after the head moved.
// Two bytes of room first, so the IP header that follows the 14-byte Ethernet header without a gap
// (as on the wire) sits 4-byte aligned; the wire bytes start at `eth`.
struct hdrs {
    __u16 _align;
    struct ethhdr eth;
    union {
        struct {
            struct iphdr ip4;
            struct udphdr udp4;
        };
        struct {
            struct ipv6hdr ip6;
            struct udphdr udp6;
        };
    };
};

#define V4_HDRS (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr))
#define V6_HDRS (sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct udphdr))
_Static_assert(__builtin_offsetof(struct hdrs, ip4) == 2 + sizeof(struct ethhdr), "no gap after eth");
_Static_assert(__builtin_offsetof(struct hdrs, udp6) == 2 + sizeof(struct ethhdr) + sizeof(struct ipv6hdr), "no gap before udp");

static __always_inline __u64 add16(__u64 s, __u16 v) { return s + v; }
static __always_inline __u64 sub16(__u64 s, __u16 v) { return s + (__u16)~v; }

static __always_inline __u64 add_words(__u64 s, const void *p, int words)
{
    const __u16 *w = p;
#pragma unroll
    for (int i = 0; i < 8; i++)
        if (i < words)
            s += w[i];
    return s;
}

static __always_inline __u64 sub_words(__u64 s, const void *p, int words)
{
    const __u16 *w = p;
#pragma unroll
    for (int i = 0; i < 8; i++)
        if (i < words)
            s += (__u16)~w[i];
    return s;
}

static __always_inline __u16 fold(__u64 s)
{
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    return (__u16)s;
}

static __always_inline void ip4_checksum(struct iphdr *ip)
{
    ip->check = 0;
    __u64 s = 0;
    const __u16 *w = (const __u16 *)ip;
#pragma unroll
    for (int i = 0; i < 10; i++)
        s += w[i];
    ip->check = (__u16)~fold(s);
}

static __always_inline void v4_mapped(__u8 out[16], __be32 a)
{
    __builtin_memset(out, 0, 10);
    out[10] = 0xff;
    out[11] = 0xff;
    __builtin_memcpy(out + 12, &a, 4);
}

static __always_inline int is_v4_mapped(const __u8 a[16])
{
    for (int i = 0; i < 10; i++)
        if (a[i])
            return 0;
    return a[10] == 0xff && a[11] == 0xff;
}

static __always_inline void count(__u32 slot, __u64 bytes)
{
    struct counter *c = bpf_map_lookup_elem(&COUNTERS, &slot);
    if (c) {
        c->packets += 1;
        c->bytes += bytes;
    }
}

// Sets the MAC addresses for the rewritten packet: the FIB's next hop out of the interface the
// packet came in on; or, where the FIB helper refuses because the server does not forward IP
// (the normal case for a relay), the next hop learned from the other side's packets (`learned`,
// zero until one arrived: the neighbour a host's packets come from is the one that reaches it
// back, as behind a default gateway or on the same LAN). In test mode the MACs are swapped.
// Anything else (other interface, unresolved neighbour, too big for the MTU, nothing learned)
// sends the original packet to userspace.
static __always_inline int route(struct xdp_md *ctx, struct hdrs *h, int v6, __u32 ip_len,
                                 const struct config *cfg, const __u8 learned[6])
{
    __u32 max = cfg && cfg->max_ip_len ? cfg->max_ip_len : 1500;
    if (ip_len > max)
        return -1;
    if (cfg && (cfg->flags & FLAG_SWAP_MACS)) {
        __u8 tmp[ETH_ALEN];
        __builtin_memcpy(tmp, h->eth.h_source, ETH_ALEN);
        __builtin_memcpy(h->eth.h_source, h->eth.h_dest, ETH_ALEN);
        __builtin_memcpy(h->eth.h_dest, tmp, ETH_ALEN);
        return 0;
    }
    struct bpf_fib_lookup fib = {};
    fib.l4_protocol = IPPROTO_UDP;
    fib.tot_len = ip_len;
    fib.ifindex = ctx->ingress_ifindex;
    if (v6) {
        fib.family = AF_INET6;
        __builtin_memcpy(fib.ipv6_src, &h->ip6.saddr, 16);
        __builtin_memcpy(fib.ipv6_dst, &h->ip6.daddr, 16);
    } else {
        fib.family = AF_INET;
        fib.ipv4_src = h->ip4.saddr;
        fib.ipv4_dst = h->ip4.daddr;
    }
    long rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
    if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED) {
        if (!(learned[0] | learned[1] | learned[2] | learned[3] | learned[4] | learned[5]))
            return -1;
        // Our MAC is the one the packet was sent to.
        __builtin_memcpy(h->eth.h_source, h->eth.h_dest, ETH_ALEN);
        __builtin_memcpy(h->eth.h_dest, learned, ETH_ALEN);
        return 0;
    }
    if (rc != BPF_FIB_LKUP_RET_SUCCESS || fib.ifindex != ctx->ingress_ifindex)
        return -1;
    __builtin_memcpy(h->eth.h_dest, fib.dmac, ETH_ALEN);
    __builtin_memcpy(h->eth.h_source, fib.smac, ETH_ALEN);
    return 0;
}

static __always_inline int mac_eq(const __u8 a[6], const __u8 b[6])
{
    return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) |
            (a[5] ^ b[5])) == 0;
}

// Rewrites addresses and ports in the stack copy, adjusting the UDP checksum sum `*s`.
static __always_inline void rewrite(struct hdrs *h, int v6, __u64 *s, const __u8 src[16],
                                    const __u8 dst[16], __be16 sport, __be16 dport)
{
    struct udphdr *udp = v6 ? &h->udp6 : &h->udp4;
    if (v6) {
        *s = sub_words(*s, &h->ip6.saddr, 8);
        *s = sub_words(*s, &h->ip6.daddr, 8);
        __builtin_memcpy(&h->ip6.saddr, src, 16);
        __builtin_memcpy(&h->ip6.daddr, dst, 16);
        *s = add_words(*s, &h->ip6.saddr, 8);
        *s = add_words(*s, &h->ip6.daddr, 8);
        h->ip6.hop_limit = TTL;
    } else {
        *s = sub_words(*s, &h->ip4.saddr, 2);
        *s = sub_words(*s, &h->ip4.daddr, 2);
        __builtin_memcpy(&h->ip4.saddr, src + 12, 4);
        __builtin_memcpy(&h->ip4.daddr, dst + 12, 4);
        *s = add_words(*s, &h->ip4.saddr, 2);
        *s = add_words(*s, &h->ip4.daddr, 2);
        h->ip4.ttl = TTL;
    }
    *s = sub16(*s, udp->source);
    *s = sub16(*s, udp->dest);
    udp->source = sport;
    udp->dest = dport;
    *s = add16(*s, udp->source);
    *s = add16(*s, udp->dest);
}

// New UDP length `ulen` (host order) into both the UDP header and the IP header; the UDP length
// counts twice in the checksum (pseudo-header and header).
static __always_inline void set_len(struct hdrs *h, int v6, __u64 *s, __u16 ulen)
{
    struct udphdr *udp = v6 ? &h->udp6 : &h->udp4;
    __u16 old = udp->len;
    __u16 new = bpf_htons(ulen);
    *s = sub16(sub16(*s, old), old);
    *s = add16(add16(*s, new), new);
    udp->len = new;
    if (v6)
        h->ip6.payload_len = new;
    else
        h->ip4.tot_len = bpf_htons(ulen + sizeof(struct iphdr));
}

static __always_inline void finish(struct hdrs *h, int v6, __u64 s)
{
    struct udphdr *udp = v6 ? &h->udp6 : &h->udp4;
    if (!v6 && udp->check == 0) {
        // IPv4 without a UDP checksum stays without one.
    } else {
        __u16 c = (__u16)~fold(s);
        udp->check = c ? c : 0xffff;
    }
    if (!v6)
        ip4_checksum(&h->ip4);
}

// Copies go through the helpers: an inline copy to the 2-byte-aligned stack slot would be expanded
// byte by byte.
static __always_inline int write_hdrs(struct xdp_md *ctx, const struct hdrs *h, int v6)
{
    if (v6)
        return bpf_xdp_store_bytes(ctx, 0, (void *)&h->eth, V6_HDRS);
    return bpf_xdp_store_bytes(ctx, 0, (void *)&h->eth, V4_HDRS);
}

SEC("xdp")
int kyuu_turn(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct hdrs h;
    int v6;
    __u32 hdr_len;
    __u8 src_ip[16], dst_ip[16];

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return XDP_PASS;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        v6 = 0;
        hdr_len = V4_HDRS;
        if (data + V4_HDRS > end || bpf_xdp_load_bytes(ctx, 0, &h.eth, V4_HDRS))
            return XDP_PASS;
        // No options, no fragments (MF set or an offset), UDP only.
        if (h.ip4.ihl != 5 || h.ip4.version != 4 || h.ip4.protocol != IPPROTO_UDP)
            return XDP_PASS;
        if (h.ip4.frag_off & bpf_htons(0x3fff))
            return XDP_PASS;
        if (bpf_ntohs(h.ip4.tot_len) != sizeof(struct iphdr) + bpf_ntohs(h.udp4.len))
            return XDP_PASS;
        v4_mapped(src_ip, h.ip4.saddr);
        v4_mapped(dst_ip, h.ip4.daddr);
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        v6 = 1;
        hdr_len = V6_HDRS;
        if (data + V6_HDRS > end || bpf_xdp_load_bytes(ctx, 0, &h.eth, V6_HDRS))
            return XDP_PASS;
        // UDP straight after the fixed header: extension headers (fragments too) go up.
        if (h.ip6.version != 6 || h.ip6.nexthdr != IPPROTO_UDP)
            return XDP_PASS;
        if (h.ip6.payload_len != h.udp6.len)
            return XDP_PASS;
        // A zero UDP checksum is not valid over IPv6 (RFC 8200 §8.1).
        if (h.udp6.check == 0)
            return XDP_PASS;
        __builtin_memcpy(src_ip, &h.ip6.saddr, 16);
        __builtin_memcpy(dst_ip, &h.ip6.daddr, 16);
    } else {
        return XDP_PASS;
    }

    struct udphdr *udp = v6 ? &h.udp6 : &h.udp4;
    __u32 ulen = bpf_ntohs(udp->len);
    if (ulen < sizeof(struct udphdr))
        return XDP_PASS;
    __u32 plen = ulen - sizeof(struct udphdr);
    // The datagram must be all there (Ethernet may pad short frames after it).
    if (data + hdr_len + plen > end)
        return XDP_PASS;
    __u8 *payload = data + hdr_len;
    __u32 zero = 0;
    const struct config *cfg = bpf_map_lookup_elem(&CONFIG, &zero);
    __u64 s = (__u16)~udp->check;

    // Client ChannelData (first two bits 01, RFC 7983) to a bound channel.
    if (plen >= 4 && payload + 4 <= (__u8 *)end && (payload[0] & 0xc0) == 0x40) {
        struct c2p_key k = {};
        __builtin_memcpy(k.client_ip, src_ip, 16);
        __builtin_memcpy(k.server_ip, dst_ip, 16);
        k.client_port = udp->source;
        k.server_port = udp->dest;
        __builtin_memcpy(&k.channel, payload, 2);
        struct c2p_val *v = bpf_map_lookup_elem(&C2P, &k);
        if (v) {
            __u32 len = ((__u32)payload[2] << 8) | payload[3];
            // Over UDP the padding to four bytes is optional (RFC 8656 §12.5); more trailing
            // bytes than padding go to userspace.
            if (len + 4 > plen || plen - 4 - len > 3)
                return XDP_PASS;
            if (is_v4_mapped(v->peer_ip) == v6)
                return XDP_PASS;
            if (bpf_ktime_get_ns() >= v->expires_ns)
                return XDP_PASS;
            __u32 pad = plen - 4 - len;
            __u32 new_ulen = sizeof(struct udphdr) + len;
            __u32 ip_len = v6 ? new_ulen + sizeof(struct ipv6hdr) : new_ulen + sizeof(struct iphdr);
            // The channel header leaves the checksum: two words at an even offset.
            s = sub_words(s, payload, 2);
            // So do the padding bytes, each by where it sits in its 16-bit word.
            __u32 off = len & 0xffff;
            __u8 padb[4] = {};
            pad &= 3;
            if (pad && bpf_xdp_load_bytes(ctx, hdr_len + 4 + off, padb, pad))
                return XDP_PASS;
#pragma unroll
            for (int i = 0; i < 3; i++) {
                if (i < pad) {
                    __u16 w = ((4 + off + i) & 1) ? ((__u16)padb[i] << 8) : padb[i];
                    s = sub16(s, w);
                }
            }
            // The client's next hop, for the other direction.
            struct p2c_key back = {};
            __builtin_memcpy(back.peer_ip, v->peer_ip, 16);
            __builtin_memcpy(back.relay_ip, v->relay_ip, 16);
            back.peer_port = v->peer_port;
            back.relay_port = v->relay_port;
            struct p2c_val *bv = bpf_map_lookup_elem(&P2C, &back);
            if (bv && !mac_eq(bv->client_mac, h.eth.h_source))
                __builtin_memcpy(bv->client_mac, h.eth.h_source, ETH_ALEN);
            rewrite(&h, v6, &s, v->relay_ip, v->peer_ip, v->relay_port, v->peer_port);
            set_len(&h, v6, &s, new_ulen);
            if (route(ctx, &h, v6, ip_len, cfg, v->peer_mac))
                return XDP_PASS;
            finish(&h, v6, s);
            __u32 slot = v->slot;
            // Drop the 4-byte channel header: headers move 4 bytes on, then the head follows.
            if (bpf_xdp_adjust_head(ctx, 4))
                return XDP_DROP;
            if (pad && bpf_xdp_adjust_tail(ctx, -(int)pad))
                return XDP_DROP;
            if (write_hdrs(ctx, &h, v6))
                return XDP_DROP;
            count(slot, len);
            return XDP_TX;
        }
    }

    // A peer's datagram to a relay address with a channel.
    struct p2c_key pk = {};
    __builtin_memcpy(pk.peer_ip, src_ip, 16);
    __builtin_memcpy(pk.relay_ip, dst_ip, 16);
    pk.peer_port = udp->source;
    pk.relay_port = udp->dest;
    struct p2c_val *pv = bpf_map_lookup_elem(&P2C, &pk);
    if (!pv)
        return XDP_PASS;
    if (is_v4_mapped(pv->client_ip) == v6)
        return XDP_PASS;
    if (bpf_ktime_get_ns() >= pv->expires_ns)
        return XDP_PASS;
    if (plen > 0xffff - 4 - sizeof(struct udphdr))
        return XDP_PASS;
    __u32 new_ulen = sizeof(struct udphdr) + 4 + plen;
    __u32 ip_len = v6 ? new_ulen + sizeof(struct ipv6hdr) : new_ulen + sizeof(struct iphdr);
    // The peer's next hop, for the other direction.
    struct c2p_key back = {};
    __builtin_memcpy(back.client_ip, pv->client_ip, 16);
    __builtin_memcpy(back.server_ip, pv->server_ip, 16);
    back.client_port = pv->client_port;
    back.server_port = pv->server_port;
    back.channel = pv->channel;
    struct c2p_val *bv = bpf_map_lookup_elem(&C2P, &back);
    if (bv && !mac_eq(bv->peer_mac, h.eth.h_source))
        __builtin_memcpy(bv->peer_mac, h.eth.h_source, ETH_ALEN);
    __be16 cd[2] = {pv->channel, bpf_htons(plen)};
    s = add_words(s, cd, 2);
    rewrite(&h, v6, &s, pv->server_ip, pv->client_ip, pv->server_port, pv->client_port);
    set_len(&h, v6, &s, new_ulen);
    if (route(ctx, &h, v6, ip_len, cfg, pv->client_mac))
        return XDP_PASS;
    finish(&h, v6, s);
    __u32 slot = pv->slot;
    if (bpf_xdp_adjust_head(ctx, -4))
        return XDP_PASS;
    if (write_hdrs(ctx, &h, v6))
        return XDP_DROP;
    data = (void *)(long)ctx->data;
    end = (void *)(long)ctx->data_end;
    __u8 *ch = data + (v6 ? V6_HDRS : V4_HDRS);
    if (ch + 4 > (__u8 *)end)
        return XDP_DROP;
    __builtin_memcpy(ch, cd, 4);
    count(slot, plen);
    return XDP_TX;
}

char _license[] SEC("license") = "Dual MIT/GPL";
