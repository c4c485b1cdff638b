// SPDX-License-Identifier: GPL-2.0
/*
 * eph's kernel recorder: one row per client TCP connection (IPv4) of one network
 * namespace, made when its socket reaches CLOSE. Loaded by harness/kernel/recorder.py;
 * built by `make setup` (clang -target bpf), and portable across kernels through
 * BTF (CO-RE): the kernel's types below name only the fields read.
 *
 * One raw tracepoint, sock:inet_sock_set_state (sk, oldstate, newstate). A client
 * socket is one that goes CLOSE -> SYN_SENT (connect()). Its later transitions give
 * the connect latency (-> ESTABLISHED), who closed first (FIN_WAIT1: this side;
 * CLOSE_WAIT: the peer), and the state it closed from (FIN_WAIT2 or CLOSING without an
 * error: it went on as a TIME_WAIT socket). Failures after the SYN (RST:
 * ECONNREFUSED, retries exhausted: ETIMEDOUT) leave their errno in sk_err at CLOSE. A
 * connect() that found no free port (EADDRNOTAVAIL) passes SYN_SENT -> CLOSE inside
 * the syscall with no local port: sport 0 says so.
 *
 * Why two programs. The kernel runs a program at most once per CPU at a time: a state
 * change in a softirq that interrupts the program on that CPU (a packet, a timer) is
 * skipped, and counted in the program's recursion_misses. A classic tracepoint's
 * programs share one such guard with every other BPF program and map syscall of the
 * CPU (bpf_prog_active); a raw tracepoint's is per program. So `first` and `second`
 * are attached in that order, and run one after the other for every state change.
 * `first` always does the work, and says which change it took in `last` (per CPU);
 * `second` does it only when `first` did not run for this change: `first` was the
 * program interrupted. A softirq cannot interrupt a softirq, so one of the two always
 * runs, and `rescued` counts the changes `second` took: first's misses less rescued
 * is what neither saw (docs/kernel.md, "The recorder's misses").
 *
 * A closed connection becomes a key of the hash map `rows`, the layout of bpftrace's
 * @r[syn_ns, est_ns, close_ns, state, addrs, ports, pid, comm] (harness/kernel/bpf.py
 * reads both): state = last_state | first_fin << 8 | err << 16; addrs = saddr << 32 |
 * daddr (network-order u32s); ports = sport << 16 | dport; ns from CLOCK_MONOTONIC.
 * eph drains `rows` from outside, thousands of keys per bpf() call
 * (harness/kernel/bpfmap.py).
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define IPPROTO_TCP 6
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_FIN_WAIT1 4
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define EADDRNOTAVAIL 99
#define EEXIST 17
#define KEYS_MAX 262144 /* connections open at once, and rows between two drains */

/* the kernel's types: only the fields read, found by name in its BTF */
struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	unsigned short skc_family;
	struct {
		struct net *net;
	} skc_net;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	int sk_err;
	__u16 sk_protocol;
} __attribute__((preserve_access_index));

struct inet_sock {
	struct sock sk;
	__be16 inet_sport;
} __attribute__((preserve_access_index));

struct conn {
	__u64 syn_ns;
	__u64 est_ns;
	__u32 pid;
	__u32 first_fin; /* 1: this side sent the first FIN; 2: the peer did */
	char comm[16];
};

struct row {
	__u64 syn_ns, est_ns, close_ns, state, addrs, ports, pid;
	char comm[16];
};

struct change {
	__u64 sk;
	__u32 oldstate, newstate;
};

/* rows made, changes `second` took, sockets followed, and those dropped unclosed: eph
 * reads open = opened - inserted - dropped while the last sockets close (KernelTrace.settle) */
enum { COUNT_INSERTED, COUNT_RESCUED, COUNT_OPENED, COUNT_DROPPED, COUNTS };

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} netns SEC(".maps"); /* the inode of the namespace watched: set by the loader */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KEYS_MAX);
	__type(key, __u64);
	__type(value, struct conn);
} open SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KEYS_MAX);
	__type(key, struct row);
	__type(value, __u64);
} rows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTS);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct change);
} last SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&counts, &which);

	if (n)
		*n += 1;
}

static __always_inline void record(struct sock *sk, int oldstate, int newstate)
{
	__u64 key = (__u64)sk;
	struct conn *c;

	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP ||
	    BPF_CORE_READ(sk, __sk_common.skc_family) != AF_INET)
		return;
	if (newstate == TCP_SYN_SENT && oldstate == TCP_CLOSE) {
		__u32 zero = 0;
		__u64 *want = bpf_map_lookup_elem(&netns, &zero);
		struct conn fresh = {};

		if (!want || BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum) != *want)
			return;
		fresh.syn_ns = bpf_ktime_get_ns();
		fresh.pid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(fresh.comm, sizeof(fresh.comm));
		/* one update for a new socket; a freed socket's entry, whose CLOSE was never
		 * seen, is replaced (and counted dropped) */
		long err = bpf_map_update_elem(&open, &key, &fresh, BPF_NOEXIST);

		if (err == -EEXIST) {
			count(COUNT_DROPPED);
			err = bpf_map_update_elem(&open, &key, &fresh, BPF_EXIST);
		}
		if (err == 0)
			count(COUNT_OPENED);
		return;
	}
	c = bpf_map_lookup_elem(&open, &key);
	if (!c)
		return;
	if (newstate == TCP_SYN_RECV) {
		/* a server's new socket at the address of a client whose CLOSE went unseen:
		 * forget that client, or its row would take this socket's ports */
		bpf_map_delete_elem(&open, &key);
		count(COUNT_DROPPED);
	} else if (newstate == TCP_ESTABLISHED) {
		c->est_ns = bpf_ktime_get_ns();
	} else if (newstate == TCP_FIN_WAIT1 || newstate == TCP_CLOSE_WAIT) {
		if (!c->first_fin)
			c->first_fin = newstate == TCP_FIN_WAIT1 ? 1 : 2;
	} else if (newstate == TCP_CLOSE) {
		struct inet_sock *inet = (struct inet_sock *)sk;
		__u64 sport = bpf_ntohs(BPF_CORE_READ(inet, inet_sport));
		__u64 dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
		__u64 err = (__u64)BPF_CORE_READ(sk, sk_err);
		__u64 one = 1;
		struct row r = {};

		if (oldstate == TCP_SYN_SENT && sport == 0)
			err = EADDRNOTAVAIL; /* no local port was found */
		r.syn_ns = c->syn_ns;
		r.est_ns = c->est_ns;
		r.close_ns = bpf_ktime_get_ns();
		r.state = (__u64)oldstate | ((__u64)c->first_fin << 8) | (err << 16);
		r.addrs = ((__u64)BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr) << 32) |
			  (__u64)BPF_CORE_READ(sk, __sk_common.skc_daddr);
		r.ports = (sport << 16) | dport;
		r.pid = c->pid;
		__builtin_memcpy(r.comm, c->comm, sizeof(r.comm));
		bpf_map_update_elem(&rows, &r, &one, BPF_ANY);
		count(COUNT_INSERTED);
		bpf_map_delete_elem(&open, &key);
	}
}

SEC("raw_tp/inet_sock_set_state")
int first(struct bpf_raw_tracepoint_args *ctx)
{
	__u32 zero = 0;
	struct change *seen = bpf_map_lookup_elem(&last, &zero);

	if (seen) {
		seen->sk = ctx->args[0];
		seen->oldstate = ctx->args[1];
		seen->newstate = ctx->args[2];
	}
	record((struct sock *)ctx->args[0], ctx->args[1], ctx->args[2]);
	return 0;
}

SEC("raw_tp/inet_sock_set_state")
int second(struct bpf_raw_tracepoint_args *ctx)
{
	__u32 zero = 0;
	struct change *seen = bpf_map_lookup_elem(&last, &zero);

	if (!seen || (seen->sk == ctx->args[0] && seen->oldstate == (__u32)ctx->args[1] &&
		      seen->newstate == (__u32)ctx->args[2]))
		return 0; /* first took it */
	count(COUNT_RESCUED);
	record((struct sock *)ctx->args[0], ctx->args[1], ctx->args[2]);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
