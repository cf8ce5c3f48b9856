// kyuu's relay steering (BPF_PROG_TYPE_SK_LOOKUP). Built by crates/kyuu-ebpf/build.rs with
// `clang -target bpf -O2`; loaded, attached to the server's network namespace and fed by
// crates/kyuu-ebpf/src/steer.rs.
//
// Every relay port (each allocation's own UDP socket stays bound: it reserves the port and sends)
// is listed in PORTS with the shard that owns it. A UDP datagram for a listed port and address is
// handed to that shard's one steering socket (SOCKS), which reads every relay port's datagrams in
// recvmmsg batches and learns the port from IP_ORIGDSTADDR / IPV6_ORIGDSTADDR. Anything not
// listed takes the kernel's normal lookup.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10
#define PORTS_PER_FAMILY 65536
#define MAX_SOCKETS 1024

// PORTS key: the local port, plus PORTS_PER_FAMILY for IPv6.
struct steer_val {
    __u32 socket; // index into SOCKS, plus one (0: not steered)
    __u32 ip4; // the relay address the port is bound to, network order (0: any)
    __u32 ip6[4]; // likewise for IPv6 (all zero: any)
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2 * PORTS_PER_FAMILY);
    __type(key, __u32);
    __type(value, struct steer_val);
} PORTS SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_SOCKMAP);
    __uint(max_entries, MAX_SOCKETS);
    __type(key, __u32);
    __type(value, __u32);
} SOCKS SEC(".maps");

SEC("sk_lookup")
int kyuu_steer(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_UDP)
        return SK_PASS;
    __u32 key = ctx->local_port & 0xffff;
    if (ctx->family == AF_INET6)
        key += PORTS_PER_FAMILY;
    else if (ctx->family != AF_INET)
        return SK_PASS;
    struct steer_val *v = bpf_map_lookup_elem(&PORTS, &key);
    if (!v || v->socket == 0)
        return SK_PASS;
    if (ctx->family == AF_INET) {
        if (v->ip4 != 0 && v->ip4 != ctx->local_ip4)
            return SK_PASS;
    } else if ((v->ip6[0] | v->ip6[1] | v->ip6[2] | v->ip6[3]) != 0) {
        if (v->ip6[0] != ctx->local_ip6[0] || v->ip6[1] != ctx->local_ip6[1] ||
            v->ip6[2] != ctx->local_ip6[2] || v->ip6[3] != ctx->local_ip6[3])
            return SK_PASS;
    }
    __u32 idx = v->socket - 1;
    struct bpf_sock *sk = bpf_map_lookup_elem(&SOCKS, &idx);
    if (!sk)
        return SK_PASS;
    // A failed assignment (the socket went away) leaves the normal lookup in charge.
    bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    return SK_PASS;
}

char _license[] SEC("license") = "Dual MIT/GPL";
