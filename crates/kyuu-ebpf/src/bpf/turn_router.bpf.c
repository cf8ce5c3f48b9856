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
// permission, and removes it when either ends. Plain STUN Binding requests to a listener
// userspace configured are answered here too (`binding()`, turn.fast_path_binding). Everything
// this program does not recognise or cannot handle goes up the stack unchanged (XDP_PASS): other
// STUN, Send/Data indications, TCP,
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

// STUN Binding in the kernel (see `binding()` below).

// SOFTWARE attribute bytes (type, length, value, zero padding) userspace hands over; a longer
// SOFTWARE leaves Binding to userspace.
#define SW_MAX 132
// Header + XOR-MAPPED-ADDRESS (IPv6) + SOFTWARE + FINGERPRINT.
#define RESP_MAX (20 + 24 + SW_MAX + 8)
#define NS 1000000000ULL

struct listener_key {
    __u8 ip[16]; // IPv4 as ::ffff:a.b.c.d; wildcard listeners are installed per local address
    __be16 port;
    __u16 _pad;
};

struct binding_cfg {
    __u32 enabled;
    __u32 rate; // answers per second per source; 0: unlimited
    __u32 burst;
    __u32 sw_len; // bytes of `sw` in use (a multiple of 4, at most SW_MAX); 0: no SOFTWARE
    __u8 sw[SW_MAX];
};

struct bucket {
    __u64 nanotokens; // tokens * 1e9
    __u64 last_ns;
};

struct binding_counter {
    __u64 answered;
    __u64 rate_limited;
};

struct scratch {
    __u8 msg[RESP_MAX + 8];
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 256);
    __type(key, struct listener_key);
    __type(value, __u32);
} LISTENERS SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct binding_cfg);
} BINDING_CFG SEC(".maps");

// Per-source token buckets. Entries are not shared atomically between CPUs: two CPUs answering
// one source at once may both take the same token (the limit then lets a few more through), and
// the LRU evicts the least recently seen source when full (its next request finds a full bucket).
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, MAX_ENTRIES);
    __type(key, struct listener_key);
    __type(value, struct bucket);
} RATE SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct binding_counter);
} BINDING_COUNTERS SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct scratch);
} SCRATCH SEC(".maps");

// CRC-32 (IEEE 802.3, reflected 0xEDB88320), for FINGERPRINT (RFC 8489 §14.7).
static const __u32 CRC_TABLE[256] = {
    0x00000000, 0x77073096, 0xee0e612c, 0x990951ba, 0x076dc419, 0x706af48f,
    0xe963a535, 0x9e6495a3, 0x0edb8832, 0x79dcb8a4, 0xe0d5e91e, 0x97d2d988,
    0x09b64c2b, 0x7eb17cbd, 0xe7b82d07, 0x90bf1d91, 0x1db71064, 0x6ab020f2,
    0xf3b97148, 0x84be41de, 0x1adad47d, 0x6ddde4eb, 0xf4d4b551, 0x83d385c7,
    0x136c9856, 0x646ba8c0, 0xfd62f97a, 0x8a65c9ec, 0x14015c4f, 0x63066cd9,
    0xfa0f3d63, 0x8d080df5, 0x3b6e20c8, 0x4c69105e, 0xd56041e4, 0xa2677172,
    0x3c03e4d1, 0x4b04d447, 0xd20d85fd, 0xa50ab56b, 0x35b5a8fa, 0x42b2986c,
    0xdbbbc9d6, 0xacbcf940, 0x32d86ce3, 0x45df5c75, 0xdcd60dcf, 0xabd13d59,
    0x26d930ac, 0x51de003a, 0xc8d75180, 0xbfd06116, 0x21b4f4b5, 0x56b3c423,
    0xcfba9599, 0xb8bda50f, 0x2802b89e, 0x5f058808, 0xc60cd9b2, 0xb10be924,
    0x2f6f7c87, 0x58684c11, 0xc1611dab, 0xb6662d3d, 0x76dc4190, 0x01db7106,
    0x98d220bc, 0xefd5102a, 0x71b18589, 0x06b6b51f, 0x9fbfe4a5, 0xe8b8d433,
    0x7807c9a2, 0x0f00f934, 0x9609a88e, 0xe10e9818, 0x7f6a0dbb, 0x086d3d2d,
    0x91646c97, 0xe6635c01, 0x6b6b51f4, 0x1c6c6162, 0x856530d8, 0xf262004e,
    0x6c0695ed, 0x1b01a57b, 0x8208f4c1, 0xf50fc457, 0x65b0d9c6, 0x12b7e950,
    0x8bbeb8ea, 0xfcb9887c, 0x62dd1ddf, 0x15da2d49, 0x8cd37cf3, 0xfbd44c65,
    0x4db26158, 0x3ab551ce, 0xa3bc0074, 0xd4bb30e2, 0x4adfa541, 0x3dd895d7,
    0xa4d1c46d, 0xd3d6f4fb, 0x4369e96a, 0x346ed9fc, 0xad678846, 0xda60b8d0,
    0x44042d73, 0x33031de5, 0xaa0a4c5f, 0xdd0d7cc9, 0x5005713c, 0x270241aa,
    0xbe0b1010, 0xc90c2086, 0x5768b525, 0x206f85b3, 0xb966d409, 0xce61e49f,
    0x5edef90e, 0x29d9c998, 0xb0d09822, 0xc7d7a8b4, 0x59b33d17, 0x2eb40d81,
    0xb7bd5c3b, 0xc0ba6cad, 0xedb88320, 0x9abfb3b6, 0x03b6e20c, 0x74b1d29a,
    0xead54739, 0x9dd277af, 0x04db2615, 0x73dc1683, 0xe3630b12, 0x94643b84,
    0x0d6d6a3e, 0x7a6a5aa8, 0xe40ecf0b, 0x9309ff9d, 0x0a00ae27, 0x7d079eb1,
    0xf00f9344, 0x8708a3d2, 0x1e01f268, 0x6906c2fe, 0xf762575d, 0x806567cb,
    0x196c3671, 0x6e6b06e7, 0xfed41b76, 0x89d32be0, 0x10da7a5a, 0x67dd4acc,
    0xf9b9df6f, 0x8ebeeff9, 0x17b7be43, 0x60b08ed5, 0xd6d6a3e8, 0xa1d1937e,
    0x38d8c2c4, 0x4fdff252, 0xd1bb67f1, 0xa6bc5767, 0x3fb506dd, 0x48b2364b,
    0xd80d2bda, 0xaf0a1b4c, 0x36034af6, 0x41047a60, 0xdf60efc3, 0xa867df55,
    0x316e8eef, 0x4669be79, 0xcb61b38c, 0xbc66831a, 0x256fd2a0, 0x5268e236,
    0xcc0c7795, 0xbb0b4703, 0x220216b9, 0x5505262f, 0xc5ba3bbe, 0xb2bd0b28,
    0x2bb45a92, 0x5cb36a04, 0xc2d7ffa7, 0xb5d0cf31, 0x2cd99e8b, 0x5bdeae1d,
    0x9b64c2b0, 0xec63f226, 0x756aa39c, 0x026d930a, 0x9c0906a9, 0xeb0e363f,
    0x72076785, 0x05005713, 0x95bf4a82, 0xe2b87a14, 0x7bb12bae, 0x0cb61b38,
    0x92d28e9b, 0xe5d5be0d, 0x7cdcefb7, 0x0bdbdf21, 0x86d3d2d4, 0xf1d4e242,
    0x68ddb3f8, 0x1fda836e, 0x81be16cd, 0xf6b9265b, 0x6fb077e1, 0x18b74777,
    0x88085ae6, 0xff0f6a70, 0x66063bca, 0x11010b5c, 0x8f659eff, 0xf862ae69,
    0x616bffd3, 0x166ccf45, 0xa00ae278, 0xd70dd2ee, 0x4e048354, 0x3903b3c2,
    0xa7672661, 0xd06016f7, 0x4969474d, 0x3e6e77db, 0xaed16a4a, 0xd9d65adc,
    0x40df0b66, 0x37d83bf0, 0xa9bcae53, 0xdebb9ec5, 0x47b2cf7f, 0x30b5ffe9,
    0xbdbdf21c, 0xcabac28a, 0x53b39330, 0x24b4a3a6, 0xbad03605, 0xcdd70693,
    0x54de5729, 0x23d967bf, 0xb3667a2e, 0xc4614ab8, 0x5d681b02, 0x2a6f2b94,
    0xb40bbe37, 0xc30c8ea1, 0x5a05df1b, 0x2d02ef8d,
};

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

static __always_inline __u32 crc32(const __u8 *p, __u32 len, __u32 max)
{
    __u32 c = 0xffffffff;
    for (__u32 i = 0; i < max; i++) {
        if (i >= len)
            break;
        c = CRC_TABLE[(c ^ p[i]) & 0xff] ^ (c >> 8);
    }
    return ~c;
}

static __always_inline int martian_source(const __u8 ip[16], int v6)
{
    if (!v6) {
        // 0/8, 127/8, multicast, reserved and broadcast.
        return ip[12] == 0 || ip[12] == 127 || ip[12] >= 224;
    }
    if (ip[0] == 0xff || is_v4_mapped(ip))
        return 1;
    __u8 any = 0;
    for (int i = 0; i < 15; i++)
        any |= ip[i];
    return !any && (ip[15] == 0 || ip[15] == 1);
}

// A STUN Binding request to a listener: answered here (XDP_TX) when it is a plain one (no
// attributes, or only a FINGERPRINT that verifies), with exactly the bytes userspace would send:
// XOR-MAPPED-ADDRESS, SOFTWARE, FINGERPRINT. Over the per-source limit: XDP_DROP, as userspace
// drops. Anything else to a listener: XDP_PASS, unchanged. Not to a listener: -1.
static __always_inline int binding(struct xdp_md *ctx, struct hdrs *h, int v6, __u32 hdr_len,
                                   __u32 plen, const __u8 src_ip[16], const __u8 dst_ip[16])
{
    struct udphdr *udp = v6 ? &h->udp6 : &h->udp4;
    struct listener_key lk = {};
    __builtin_memcpy(lk.ip, dst_ip, 16);
    lk.port = udp->dest;
    if (!bpf_map_lookup_elem(&LISTENERS, &lk))
        return -1;
    __u32 zero = 0;
    const struct binding_cfg *bc = bpf_map_lookup_elem(&BINDING_CFG, &zero);
    if (!bc || !bc->enabled)
        return XDP_PASS;
    if (plen != 20 && plen != 28)
        return XDP_PASS;
    __u8 req[28];
    if (bpf_xdp_load_bytes(ctx, hdr_len, req, 20))
        return XDP_PASS;
    if (req[0] != 0 || req[1] != 1 || req[2] != 0 || req[3] != plen - 20)
        return XDP_PASS;
    if (req[4] != 0x21 || req[5] != 0x12 || req[6] != 0xa4 || req[7] != 0x42)
        return XDP_PASS;
    if (plen == 28) {
        if (bpf_xdp_load_bytes(ctx, hdr_len + 20, req + 20, 8))
            return XDP_PASS;
        if (req[20] != 0x80 || req[21] != 0x28 || req[22] != 0 || req[23] != 4)
            return XDP_PASS;
        __u32 want = crc32(req, 20, 20) ^ 0x5354554e;
        __u32 got = ((__u32)req[24] << 24) | ((__u32)req[25] << 16) | ((__u32)req[26] << 8) | req[27];
        if (want != got)
            return XDP_PASS;
    }
    // Sources the stack would not deliver, and port 0 (userspace cannot send there).
    if (udp->source == 0 || martian_source(src_ip, v6))
        return XDP_PASS;
    __u32 sw_len = bc->sw_len;
    if (sw_len > SW_MAX || (sw_len & 3))
        return XDP_PASS;

    struct binding_counter *cnt = bpf_map_lookup_elem(&BINDING_COUNTERS, &zero);
    if (bc->rate) {
        struct listener_key rk = {};
        __builtin_memcpy(rk.ip, src_ip, 16);
        __u64 now = bpf_ktime_get_ns();
        __u64 full = (__u64)bc->burst * NS;
        struct bucket *b = bpf_map_lookup_elem(&RATE, &rk);
        if (!b) {
            if (full < NS) {
                if (cnt)
                    cnt->rate_limited += 1;
                return XDP_DROP;
            }
            struct bucket nb = {.nanotokens = full - NS, .last_ns = now};
            bpf_map_update_elem(&RATE, &rk, &nb, BPF_ANY);
        } else {
            __u64 tokens = b->nanotokens;
            __u64 elapsed = now > b->last_ns ? now - b->last_ns : 0;
            if (elapsed >= full / bc->rate)
                tokens = full;
            else
                tokens += elapsed * bc->rate;
            if (tokens > full)
                tokens = full;
            b->last_ns = now;
            if (tokens < NS) {
                b->nanotokens = tokens;
                if (cnt)
                    cnt->rate_limited += 1;
                return XDP_DROP;
            }
            b->nanotokens = tokens - NS;
        }
    }

    struct scratch *sc = bpf_map_lookup_elem(&SCRATCH, &zero);
    if (!sc)
        return XDP_PASS;
    __u8 *m = sc->msg;
    // Header: Binding success response, same transaction id.
    m[0] = 0x01;
    m[1] = 0x01;
    __builtin_memcpy(m + 4, req + 4, 16);
    // XOR-MAPPED-ADDRESS: the request's source, XOR'd with the cookie (and transaction id).
    __be16 xport = udp->source ^ bpf_htons(0x2112);
    __u32 off;
    if (v6) {
        m[20] = 0x00;
        m[21] = 0x20;
        m[22] = 0;
        m[23] = 20;
        m[24] = 0;
        m[25] = 0x02;
        __builtin_memcpy(m + 26, &xport, 2);
        for (int i = 0; i < 16; i++)
            m[28 + i] = src_ip[i] ^ req[4 + i];
        __builtin_memcpy(m + 44, bc->sw, SW_MAX);
        off = 44;
    } else {
        m[20] = 0x00;
        m[21] = 0x20;
        m[22] = 0;
        m[23] = 8;
        m[24] = 0;
        m[25] = 0x01;
        __builtin_memcpy(m + 26, &xport, 2);
        for (int i = 0; i < 4; i++)
            m[28 + i] = src_ip[12 + i] ^ req[4 + i];
        __builtin_memcpy(m + 32, bc->sw, SW_MAX);
        off = 32;
    }
    __u32 fp = off + sw_len;
    if (fp > RESP_MAX - 8)
        return XDP_PASS;
    __u32 total = fp + 8;
    m[2] = (total - 20) >> 8;
    m[3] = (total - 20) & 0xff;
    __u32 crc = crc32(m, fp, RESP_MAX - 8) ^ 0x5354554e;
    __u8 *f = m + fp;
    f[0] = 0x80;
    f[1] = 0x28;
    f[2] = 0;
    f[3] = 4;
    f[4] = crc >> 24;
    f[5] = crc >> 16;
    f[6] = crc >> 8;
    f[7] = crc;

    // Headers: back to where the request came from.
    __u8 mac[ETH_ALEN];
    __builtin_memcpy(mac, h->eth.h_source, ETH_ALEN);
    __builtin_memcpy(h->eth.h_source, h->eth.h_dest, ETH_ALEN);
    __builtin_memcpy(h->eth.h_dest, mac, ETH_ALEN);
    __be16 port = udp->source;
    udp->source = udp->dest;
    udp->dest = port;
    __u16 ulen = sizeof(struct udphdr) + total;
    udp->len = bpf_htons(ulen);
    udp->check = 0;
    __u64 s = 0;
    if (v6) {
        struct in6_addr a = h->ip6.saddr;
        h->ip6.saddr = h->ip6.daddr;
        h->ip6.daddr = a;
        h->ip6.payload_len = udp->len;
        h->ip6.hop_limit = TTL;
        s = add_words(s, &h->ip6.saddr, 8);
        s = add_words(s, &h->ip6.daddr, 8);
    } else {
        __be32 a = h->ip4.saddr;
        h->ip4.saddr = h->ip4.daddr;
        h->ip4.daddr = a;
        h->ip4.tot_len = bpf_htons(ulen + sizeof(struct iphdr));
        h->ip4.ttl = TTL;
        s = add_words(s, &h->ip4.saddr, 2);
        s = add_words(s, &h->ip4.daddr, 2);
    }
    // Pseudo-header length and protocol, then the UDP header (checksum zero) and the message.
    s = add16(s, udp->len);
    s = add16(s, bpf_htons(IPPROTO_UDP));
    s = add_words(s, udp, 4);
    const __u16 *w = (const __u16 *)m;
    for (__u32 i = 0; i < RESP_MAX / 2; i++) {
        if (2 * i >= total)
            break;
        s += w[i];
    }
    __u16 c = (__u16)~fold(s);
    udp->check = c ? c : 0xffff;
    if (!v6)
        ip4_checksum(&h->ip4);

    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    int delta = (int)(hdr_len + total) - (int)(end - data);
    if (delta && bpf_xdp_adjust_tail(ctx, delta))
        return XDP_PASS;
    if (write_hdrs(ctx, h, v6))
        return XDP_DROP;
    if (total < 28 || total > RESP_MAX)
        return XDP_DROP;
    if (bpf_xdp_store_bytes(ctx, hdr_len, m, total))
        return XDP_DROP;
    if (cnt)
        cnt->answered += 1;
    return XDP_TX;
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

    // STUN (first two bits 00, RFC 7983) to a listener: Binding may be answered here.
    if (plen >= 20 && payload + 1 <= (__u8 *)end && (payload[0] & 0xc0) == 0) {
        int rc = binding(ctx, &h, v6, hdr_len, plen, src_ip, dst_ip);
        if (rc >= 0)
            return rc;
    }

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
