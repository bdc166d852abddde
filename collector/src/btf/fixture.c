/*
 * The kernel's types that synspan reads members of, cut down to their shape: typedefs,
 * qualifiers, anonymous unions and structs nested in each other, a bitfield, pointers between
 * structs. Offsets differ from any kernel's; the unit tests of btf.rs know them.
 *
 * Regenerate fixture.btf (gcc and pahole from dwarves):
 *   gcc -g -c -o /tmp/fixture.o fixture.c && pahole --btf_encode_detached=fixture.btf /tmp/fixture.o
 */

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u64 __addrpair;
typedef __u32 __portpair;

struct in6_addr {
	union {
		__u8 u6_addr8[16];
		__be32 u6_addr32[4];
	} in6_u;
};

struct sock_common {
	union {
		__addrpair skc_addrpair;
		struct {
			__be32 skc_daddr;
			__be32 skc_rcv_saddr;
		};
	};
	union {
		unsigned int skc_hash;
		__u16 skc_u16hashes[2];
	};
	union {
		__portpair skc_portpair;
		struct {
			__be16 skc_dport;
			__u16 skc_num;
		};
	};
	unsigned short skc_family;
	volatile unsigned char skc_state;
	unsigned char skc_reuse : 4;
	unsigned char skc_reuseport : 1;
	int skc_bound_dev_if;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
};

struct sock {
	struct sock_common __sk_common;
	const int sk_rcvbuf;
	int sk_err;
	int sk_err_soft;
	__u8 sk_gso_disabled : 1;
	__u8 sk_kern_sock : 1;
	__u8 sk_no_check_tx : 1;
	__u16 sk_type;
	__u16 sk_protocol;
};

struct inet_sock {
	struct sock sk;
	__be32 inet_saddr;
	__be16 inet_sport;
};

struct file {
	unsigned int f_flags;
	void *private_data;
};

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
};

struct files_struct {
	int count;
	struct fdtable *fdt;
};

struct task_struct {
	unsigned int __state;
	void *stack;
	struct files_struct *files;
};

struct socket {
	int state;
	short type;
	struct file *file;
	struct sock *sk;
};

struct inet_sock fixture_inet_sock;
struct task_struct fixture_task;
struct socket fixture_socket;
