/* pcsc-ebpf-spy, kernel side (compiled at run time by bcc).
 *
 * The machinery common to every SCard* function lives here; what each one
 * captures (capture_enter, capture_return: a switch on the function's index)
 * and the programs (pcsc_enter and pcsc_return, given the index by the
 * uprobe_multi cookie, or pcsc_enter_N / pcsc_return_N) are generated from
 * the function table in ebpf_pcsc/functions.py by ebpf_pcsc/codegen.py and
 * appended to this text.
 */
#include <uapi/linux/ptrace.h>
#include "pcsc_event.h"

/* bcc 0.26 looks up bpf_probe_read_user in /proc/kallsyms when the source
 * calls it by that name (to fall back to bpf_probe_read on kernels before
 * 5.5): reading and hashing the whole symbol table takes ~0.25 s, and it
 * does so once more for bpf_probe_read_kernel whatever the source says.
 * ebpf_pcsc/bcc_compile.py makes both cheap where it can; where it cannot,
 * this spares the first.  Every kernel we run on has the helper: we call it
 * under our own name. */
static long (*read_user)(void *dst, u32 size, const void *unsafe_ptr) =
	(void *)BPF_FUNC_probe_read_user;
static long (*read_user_str)(void *dst, u32 size, const void *unsafe_ptr) =
	(void *)BPF_FUNC_probe_read_user_str;

/* Per CPU: enum pcsc_count (pcsc_event.h). */
BPF_PERCPU_ARRAY(counts, u64, PCSC_COUNTS);

static __always_inline void count(u32 which)
{
	u64 *n = counts.lookup(&which);

	if (n)
		++*n;
}

/* The records' way to user space: with PCSC_RINGBUF (Linux >= 5.8), one
 * BPF ring buffer shared by the CPUs, which costs the traced thread less per
 * record; else the perf buffer (one ring per CPU).  Either way user space is
 * woken once per batch, not for each record (every wakeup is an interrupt
 * the traced thread pays for): here once per PCSC_WAKEUP_BYTES written by a
 * CPU; the rest is read when the tracer's poll times out. */
#ifdef PCSC_RINGBUF
BPF_RINGBUF_OUTPUT(events, PCSC_RINGBUF_PAGES);

static __always_inline void emit(void *ctx, void *data, u32 size)
{
	u32 since = PCSC_COUNT_SINCE_WAKEUP;
	u64 *n = counts.lookup(&since);
	u64 flags = BPF_RB_NO_WAKEUP;

	if (n && (*n += size) >= PCSC_WAKEUP_BYTES) {
		*n = 0;
		flags = BPF_RB_FORCE_WAKEUP;
	}
	if (events.ringbuf_output(data, size, flags) < 0)
		count(PCSC_COUNT_LOST);
}
#else
BPF_PERF_OUTPUT(events);

static __always_inline void emit(void *ctx, void *data, u32 size)
{
	/* Counted here, not only by perf's own LOST record: the kernel writes
	 * that one with the next record that fits, and at the end of a burst
	 * there may be none. */
	if (events.perf_submit(ctx, data, size) < 0)
		count(PCSC_COUNT_LOST);
}
#endif

/* The call in flight on each thread, from entry to return (a record whose
 * head.call_ts is 0 is idle), and what the kernel side keeps about the
 * thread from call to call.  inflight_get(1) creates the thread's state
 * when it has none. */
enum filter_state {
	FILTER_UNKNOWN = 0,       /* not looked up yet */
	FILTER_TRACED = 1,
	FILTER_NOT_TRACED = 2,
};

struct inflight {
	struct pcsc_call call;
	/* enum filter_state: is this thread's process traced (-p, command
	 * mode)?  Task storage only: the LRU hash filters first. */
	u32 filter;
};

#ifdef PCSC_INFLIGHT_HASH
/* Before Linux 6.2 a task-storage lookup fails whenever another task-storage
 * operation holds the CPU's busy counter (a preempted one, of any program):
 * a RETURN that misses its record would leave the thread "in a call" for
 * good.  There, a hash map by thread id; LRU, so that threads that are gone
 * make room (8,192 threads at a time: the value is 704 bytes, and an LRU
 * hash allocates them all at once). */
BPF_TABLE("lru_hash", u32, struct inflight, inflight, 8192);
BPF_PERCPU_ARRAY(inflight_zero, struct inflight, 1);   /* all zeros: a new record */

static __always_inline struct inflight *inflight_get(int create)
{
	u32 tid = (u32)bpf_get_current_pid_tgid(), zero = 0;
	struct inflight *c = inflight.lookup(&tid), *blank;

	if (c || !create)
		return c;
	blank = inflight_zero.lookup(&zero);
	if (!blank)
		return NULL;
	inflight.update(&tid, blank);
	return inflight.lookup(&tid);
}
#else
/* In the thread's own storage: no hashing, no allocation per call, and it
 * goes away with the thread. */
BPF_TASK_STORAGE(inflight, struct inflight);

static __always_inline struct inflight *inflight_get(int create)
{
	return inflight.task_storage_get(bpf_get_current_task_btf(), NULL,
					 create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}
#endif

/* The thread's in-flight call record, NULL when it has none. */
static __always_inline struct pcsc_call *inflight_call(void)
{
	struct inflight *f = inflight_get(0);

	return f ? &f->call : NULL;
}

/* Scratch space: a RETURN record and a DATA chunk are far larger than the
 * 512-byte BPF stack. */
BPF_PERCPU_ARRAY(scratch_call, struct pcsc_call, 1);
BPF_PERCPU_ARRAY(scratch_data, struct pcsc_data, 1);

#ifdef PCSC_FILTER_PIDS
/* Only these processes (tgids) are traced: filtering here, not in user
 * space, keeps other applications' calls out of the buffer. */
BPF_HASH(traced_pids, u32, u8, 4096);
#endif

/* id: bpf_get_current_pid_tgid(), which the caller has at hand. */
static __always_inline void fill_head(struct pcsc_head *h, u16 kind, u16 func, u64 id)
{
	h->ts = bpf_ktime_get_ns();
	h->call_ts = h->ts;
	h->pid = id >> 32;
	h->tid = (u32)id;
	h->kind = kind;
	h->func = func;
}

/* Entry of an SCard* function.  Returns the in-flight record to fill, or
 * NULL when this call is not to be reported: another process, or a nested
 * call (pcsc-lite >= 2.1's libpcsclite.so.1 forwards to
 * libpcsclite_real.so.1, and both are probed: only the outer call, the
 * application's own, is reported). */
static __always_inline struct pcsc_call *call_begin(struct pt_regs *ctx, u32 func)
{
	u64 id = bpf_get_current_pid_tgid();
	struct inflight *f;
	struct pcsc_call *c;

#if defined(PCSC_FILTER_PIDS) && defined(PCSC_INFLIGHT_HASH)
	/* Untraced threads get no record: they would crowd the LRU. */
	u32 pid = id >> 32;
	if (!traced_pids.lookup(&pid))
		return NULL;
#endif
	f = inflight_get(1);
	if (!f)
		return NULL;
#if defined(PCSC_FILTER_PIDS) && !defined(PCSC_INFLIGHT_HASH)
	/* Whether the process is traced, looked up at the thread's first call
	 * only: a process is traced from its start (its pid is in traced_pids
	 * before the probes are attached, or before it runs when it is forked)
	 * to its end, and its threads' storage goes away with them. */
	if (f->filter == FILTER_UNKNOWN) {
		u32 pid = id >> 32;

		f->filter = traced_pids.lookup(&pid) ? FILTER_TRACED : FILTER_NOT_TRACED;
	}
	if (f->filter != FILTER_TRACED)
		return NULL;
#endif
	c = &f->call;
	if (c->head.call_ts) {
		c->depth++;
		return NULL;
	}
	/* The thread's name stays in its record from call to call (reading it
	 * cost as much as a record): read at the thread's first call, and at
	 * the first after an exec (sched_process_exec clears it).  A thread
	 * renamed later (PR_SET_NAME) keeps the name it had. */
	if (!c->head.comm[0])
		bpf_get_current_comm(&c->head.comm, sizeof(c->head.comm));
	/* Not the inline bytes: only buf.len of them are sent. */
	__builtin_memset(&c->rv, 0, offsetof(struct pcsc_call, data) - offsetof(struct pcsc_call, rv));
	c->buf.field = PCSC_NO_FIELD;
	fill_head(&c->head, PCSC_REC_ENTER, func, id);
	c->args[0] = PT_REGS_PARM1(ctx);
	c->args[1] = PT_REGS_PARM2(ctx);
	c->args[2] = PT_REGS_PARM3(ctx);
	c->args[3] = PT_REGS_PARM4(ctx);
	c->args[4] = PT_REGS_PARM5(ctx);
	c->args[5] = PT_REGS_PARM6(ctx);
	/* x86-64: the 7th argument is on the stack, above the return address. */
	if (func < 64 && ((1ULL << func) & PCSC_SEVEN_ARGS))
		read_user(&c->args[6], sizeof(u64), (void *)(PT_REGS_SP(ctx) + 8));
	return c;
}

/* Return of an SCard* function.  *entry receives the in-flight record (the
 * arguments: output pointers are saved at entry because at return the
 * registers no longer hold them); the result is the RETURN record to fill. */
static __always_inline struct pcsc_call *call_end(struct pt_regs *ctx, struct pcsc_call **entry)
{
	u32 zero = 0;
	struct pcsc_call *c, *r;

	c = inflight_call();
	if (!c || !c->head.call_ts)
		return NULL;
	if (c->depth) {
		c->depth--;
		return NULL;
	}
	r = scratch_call.lookup(&zero);
	if (!r)
		return NULL;
	__builtin_memcpy(r, c, offsetof(struct pcsc_call, buf));
	r->head.ts = bpf_ktime_get_ns();
	r->head.kind = PCSC_REC_RETURN;
	r->rv = PT_REGS_RC(ctx);
	r->valid = 0;
	__builtin_memset(r->words, 0, sizeof(r->words));
	__builtin_memset(&r->buf, 0, sizeof(r->buf));
	r->buf.field = PCSC_NO_FIELD;
	*entry = c;
	return r;
}

/* A phase's record, with its inline bytes. */
static __always_inline void emit_call(void *ctx, struct pcsc_call *c)
{
	/* buf.len < PCSC_INLINE: the mask changes nothing, it bounds the size
	 * for the verifier. */
	emit(ctx, c, offsetof(struct pcsc_call, data) + (c->buf.len & (PCSC_INLINE - 1)));
}

/* The ENTER record closes the entry phase. */
static __always_inline void call_submit(struct pt_regs *ctx, struct pcsc_call *c)
{
	emit_call(ctx, c);
}

/* The RETURN record closes the return phase; the thread is out of the call. */
static __always_inline void call_finish(struct pt_regs *ctx, struct pcsc_call *r,
					struct pcsc_call *entry)
{
	emit_call(ctx, r);
	entry->head.call_ts = 0;
}

/* One 64-bit word through a pointer: *(u64 *)(addr + off). */
static __always_inline void read_word(struct pcsc_call *c, int slot, u64 addr, u64 off)
{
	if (!addr || slot >= PCSC_MAX_WORDS)
		return;
	if (read_user(&c->words[slot], sizeof(u64), (void *)(addr + off)) == 0)
		c->valid |= 1U << slot;
}

/* Two words side by side (a SCARD_IO_REQUEST): one read of user memory, not
 * two (a read costs more than its bytes); one at a time if that fails. */
static __always_inline void read_word_pair(struct pcsc_call *c, int slot, u64 addr, u64 off)
{
	if (!addr || slot + 1 >= PCSC_MAX_WORDS)
		return;
	if (read_user(&c->words[slot], 2 * sizeof(u64), (void *)(addr + off)) == 0) {
		c->valid |= 3U << slot;
		return;
	}
	read_word(c, slot, addr, off);
	read_word(c, slot + 1, addr, off + 8);
}

/* The value of a word of this phase, 0 when it could not be read. */
static __always_inline u64 word(struct pcsc_call *c, int slot)
{
	if (slot >= PCSC_MAX_WORDS || !(c->valid & (1U << slot)))
		return 0;
	return c->words[slot];
}

/* With SCARD_AUTOALLOCATE in the length word, the buffer argument is a
 * pointer to the pointer the library allocated. */
static __always_inline u64 buffer_ptr(struct pcsc_call *entry, int len_slot, u64 arg)
{
	u64 p = 0;

	if (!arg || !(entry->valid & (1U << len_slot)) || entry->words[len_slot] != PCSC_AUTOALLOCATE)
		return arg;
	read_user(&p, sizeof(p), (void *)arg);
	return p;
}

static __always_inline struct pcsc_data *data_begin(struct pcsc_head *h, u16 field, u16 index)
{
	u32 zero = 0;
	struct pcsc_data *d = scratch_data.lookup(&zero);

	if (!d)
		return NULL;
	d->head = *h;
	d->head.kind = PCSC_REC_DATA;
	d->buf.field = field;
	d->buf.index = index;
	d->buf.flags = 0;
	d->buf.total = 0;
	d->buf.offset = 0;
	d->buf.len = 0;
	return d;
}

/* The length a NULL buffer was given, as a u32. */
static __always_inline u32 clamp_total(u64 len)
{
	return len > 0xffffffffULL ? 0xffffffff : len;
}

/* A buffer shorter than PCSC_INLINE, in the phase's own record c, if no
 * other took its place.  Returns 0 when it is not: DATA records carry it. */
static __always_inline int inline_bytes(struct pcsc_call *c, u16 field, u16 index,
					u64 addr, u64 len)
{
	if (c->buf.field != PCSC_NO_FIELD || len >= PCSC_INLINE)
		return 0;
	c->buf.field = field;
	c->buf.index = index;
	c->buf.total = len;
	if (!addr) {
		c->buf.flags = PCSC_DATA_NULL;
		return 1;
	}
	/* len < PCSC_INLINE: the mask bounds the very register the helper
	 * gets, for the verifier. */
	len &= PCSC_INLINE - 1;
	if (read_user(c->data, len, (void *)addr))
		c->buf.flags = PCSC_DATA_FAULT;
	else
		c->buf.len = len;
	return 1;
}

/* A buffer of len bytes at addr, captured for the call whose phase record
 * is c: in c if it is short, else in DATA records, in chunks, byte-exact up
 * to PCSC_MAX_BUFFER. */
static __always_inline void emit_bytes(struct pt_regs *ctx, struct pcsc_call *c,
				       u16 field, u16 index, u64 addr, u64 len)
{
	struct pcsc_data *d;

	if (inline_bytes(c, field, index, addr, len))
		return;
	d = data_begin(&c->head, field, index);
	if (!d)
		return;
	if (!addr) {
		d->buf.flags = PCSC_DATA_NULL;
		d->buf.total = clamp_total(len);
		emit(ctx, d, offsetof(struct pcsc_data, data));
		return;
	}
	if (len > PCSC_MAX_BUFFER) {
		d->buf.flags = PCSC_DATA_TRUNCATED;
		len = PCSC_MAX_BUFFER;
	}
	d->buf.total = len;
	/* A loop, not unrolled (bounded loops verify since Linux 5.3): the
	 * unrolled chunks made a third of the program's instructions, which
	 * cost compile time at every start, and instruction cache. */
#pragma clang loop unroll(disable)
	for (int i = 0; i < PCSC_MAX_CHUNKS; i++) {
		u32 off = i * PCSC_CHUNK;
		u64 n;

		if (i > 0 && off >= len)
			break;
		n = len > off ? len - off : 0;
		if (n > PCSC_CHUNK)
			n = PCSC_CHUNK;
		/* Clamped above; the mask changes nothing but bounds the very
		 * register handed to the helpers (the verifier tracks it, not
		 * an earlier copy). */
		n &= 2 * PCSC_CHUNK - 1;
		d->buf.offset = off;
		if (read_user(d->data, n, (void *)(addr + off))) {
			d->buf.flags |= PCSC_DATA_FAULT;
			d->buf.len = 0;
			emit(ctx, d, offsetof(struct pcsc_data, data));
			return;
		}
		d->buf.len = n;
		emit(ctx, d, offsetof(struct pcsc_data, data) + n);
	}
}

/* A NUL-terminated string at addr (without its NUL). */
static __always_inline void emit_str(struct pt_regs *ctx, struct pcsc_head *h,
				     u16 field, u16 index, u64 addr)
{
	struct pcsc_data *d = data_begin(h, field, index);
	long n;

	if (!d)
		return;
	if (!addr) {
		d->buf.flags = PCSC_DATA_NULL;
		emit(ctx, d, offsetof(struct pcsc_data, data));
		return;
	}
	n = read_user_str(d->data, PCSC_MAX_STRING, (void *)addr);
	if (n <= 0) {
		d->buf.flags = PCSC_DATA_FAULT;
		n = 0;
	} else {
		n -= 1;
		if (n >= PCSC_MAX_STRING - 1)
			d->buf.flags = PCSC_DATA_TRUNCATED;
	}
	n &= PCSC_MAX_STRING - 1;
	d->buf.len = n;
	d->buf.total = n;
	emit(ctx, d, offsetof(struct pcsc_data, data) + n);
}

/* An SCARD_READERSTATE array: the structures (index 0), then the reader name
 * each one points to (index i + 1). */
static __always_inline void emit_readerstates(struct pt_regs *ctx, struct pcsc_call *c,
					      u16 field, u64 addr, u64 count)
{
	struct pcsc_head *h = &c->head;
	u64 n = count > PCSC_MAX_READERS ? PCSC_MAX_READERS : count;

	emit_bytes(ctx, c, field, 0, addr, count * PCSC_READERSTATE_SIZE);
	if (!addr)
		return;
#pragma clang loop unroll(disable)
	for (int i = 0; i < PCSC_MAX_READERS; i++) {
		u64 name = 0;

		if (i >= n)
			break;
		read_user(&name, sizeof(name), (void *)(addr + i * PCSC_READERSTATE_SIZE));
		emit_str(ctx, h, field, i + 1, name);
	}
}

/* Generated (codegen.py): what each function reads at entry and at return. */
static __always_inline void capture_enter(struct pt_regs *ctx, struct pcsc_call *c, u32 func);
static __always_inline void capture_return(struct pt_regs *ctx, struct pcsc_call *r,
					   struct pcsc_call *e, u32 func);

/* Entry of SCard* function number func (its index in the table). */
static __always_inline int on_enter(struct pt_regs *ctx, u32 func)
{
	struct pcsc_call *c = call_begin(ctx, func);

	if (!c)
		return 0;
	capture_enter(ctx, c, func);
	call_submit(ctx, c);
	return 0;
}

/* Return of SCard* function number func. */
static __always_inline int on_return(struct pt_regs *ctx, u32 func)
{
	struct pcsc_call *e = NULL;
	struct pcsc_call *r = call_end(ctx, &e);

	if (!r || !e)
		return 0;
	capture_return(ctx, r, e, func);
	call_finish(ctx, r, e);
	return 0;
}

#ifdef PCSC_FILTER_PIDS
/* Whether the exiting thread is its process's last: do_exit() has already
 * counted it out of signal->live.  Read at the running kernel's offsets
 * (from its BTF), like the fork probe's tgid. */
static __always_inline int last_thread(void)
{
	void *task = (void *)bpf_get_current_task();
	void *signal = NULL;
	int live = 1;

	bpf_probe_read_kernel(&signal, sizeof(signal), task + PCSC_TASK_SIGNAL_OFFSET);
	if (signal)
		bpf_probe_read_kernel(&live, sizeof(live), signal + PCSC_SIGNAL_LIVE_OFFSET);
	return live == 0;
}
#endif

/* A thread that ends inside a call never returns from it: report the call
 * as aborted and forget it, so nothing in flight outlives its thread. */
RAW_TRACEPOINT_PROBE(sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	struct pcsc_call *c;

#ifdef PCSC_FILTER_PIDS
	/* The process is gone with its last thread, not with its main one,
	 * which may end first (pthread_exit) or be replaced by an exec from
	 * another thread: then its pid may be given to another process. */
	if (last_thread()) {
		u32 pid = id >> 32;

		traced_pids.delete(&pid);
	}
#endif
	c = inflight_call();
	if (!c)
		return 0;
	if (c->head.call_ts) {
		c->head.kind = PCSC_REC_ABORT;
		c->head.ts = bpf_ktime_get_ns();
		/* Sent without the entry's inline bytes: its buf says so. */
		c->buf.field = PCSC_NO_FIELD;
		c->buf.len = 0;
		emit(ctx, c, offsetof(struct pcsc_call, data));
		c->head.call_ts = 0;
	}
#ifdef PCSC_INFLIGHT_HASH
	/* Its thread id may be given to a new thread, which starts afresh
	 * (task storage goes away with its thread by itself). */
	inflight.delete(&tid);
#endif
	return 0;
}

#ifdef PCSC_FILTER_PIDS
/* A process created by a traced process is traced too (command mode traces
 * COMMAND and its descendants).  The child's tgid is read at
 * PCSC_TASK_TGID_OFFSET, taken from the running kernel's BTF: the headers
 * bcc compiles with may describe another kernel's task_struct. */
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	u32 parent = bpf_get_current_pid_tgid() >> 32;
	void *child = (void *)ctx->args[1];
	u32 tgid = 0;
	u8 one = 1;

	if (!traced_pids.lookup(&parent))
		return 0;
	bpf_probe_read_kernel(&tgid, sizeof(tgid), child + PCSC_TASK_TGID_OFFSET);
	if (tgid)
		traced_pids.update(&tgid, &one);
	return 0;
}
#endif

#ifdef PCSC_DISCOVER
/* Library discovery.  The dynamic loader calls _dl_debug_state() (the
 * r_brk hook debuggers use) before and after it maps libraries, at program
 * start and in dlopen(): user space then looks for new libpcsclite images in
 * that process's maps.  A program start may bring a new loader (another root
 * or container): user space probes that one too.  These records have their
 * own buffer, which wakes user space at each one (the calls' buffer wakes
 * it once per batch): the process is about to call what it loaded. */
#ifdef PCSC_RINGBUF
BPF_RINGBUF_OUTPUT(loads, PCSC_LOADS_PAGES);

static __always_inline void emit_load(void *ctx, void *data, u32 size)
{
	if (loads.ringbuf_output(data, size, BPF_RB_FORCE_WAKEUP) < 0)
		count(PCSC_COUNT_LOADS_LOST);
}
#else
BPF_PERF_OUTPUT(loads);

static __always_inline void emit_load(void *ctx, void *data, u32 size)
{
	if (loads.perf_submit(ctx, data, size) < 0)
		count(PCSC_COUNT_LOADS_LOST);
}
#endif

static __always_inline void notify(void *ctx, u16 kind)
{
	struct pcsc_head h = {};
	u64 id = bpf_get_current_pid_tgid();

#ifdef PCSC_FILTER_PIDS
	u32 pid = id >> 32;
	if (!traced_pids.lookup(&pid))
		return;
#endif
	fill_head(&h, kind, 0, id);
	bpf_get_current_comm(&h.comm, sizeof(h.comm));
	emit_load(ctx, &h, sizeof(h));
}

int pcsc_loaded(struct pt_regs *ctx)
{
	notify(ctx, PCSC_REC_LOADED);
	return 0;
}
#endif

/* A program start: the thread's name is read again at its next call. */
RAW_TRACEPOINT_PROBE(sched_process_exec)
{
#ifdef PCSC_INFLIGHT_HASH
	/* The record goes, under the id the thread had: a thread other than the
	 * main one that execs takes the process's id (args[1] is the old one),
	 * and the next call makes a new record. */
	u32 old_tid = ctx->args[1];

	inflight.delete(&old_tid);
#else
	struct pcsc_call *c = inflight_call();

	if (c)
		c->head.comm[0] = 0;
#endif
#ifdef PCSC_DISCOVER
	notify(ctx, PCSC_REC_EXEC);
#endif
	return 0;
}
