/* The kernel/user boundary of pcsc-ebpf-spy: every record the BPF program
 * sends through the BPF ring buffer (or the perf buffer), and the counters
 * it keeps.  ebpf_pcsc/layout.py mirrors this file (and
 * tests/test_layout.py fails when the two drift).
 *
 * One application call produces, in this order, on the CPU that ran it:
 *   entry phase:  DATA records for the inputs, then one ENTER record;
 *   return phase: DATA records for the outputs, then one RETURN record.
 * The ENTER/RETURN record closes its phase, so user space knows a phase is
 * complete when it sees it.  It carries one buffer of the phase itself,
 * the first one shorter than PCSC_INLINE (a short APDU and its response:
 * each record costs the traced thread, and the tracer, more than its bytes);
 * the other buffers, and longer ones, travel in DATA records.  A thread may
 * migrate between entry and return: user space matches the phases by (tid,
 * call_ts), never by arrival order.
 *
 * Fixed-size fields first, variable-length data last.
 */
#ifndef PCSC_EVENT_H
#define PCSC_EVENT_H

#define PCSC_COMM_LEN 16
#define PCSC_MAX_ARGS 7           /* SCardTransmit, SCardControl, SCardStatus */
#define PCSC_MAX_WORDS 6          /* words read through pointers, per phase */
#define PCSC_MAX_BUFFER 65548     /* MAX_BUFFER_SIZE_EXTENDED */
/* One perf sample must stay under 64 KiB and the scratch value under the
 * 32 KiB per-CPU limit: buffers travel in chunks of this size. */
#define PCSC_CHUNK 16384
#define PCSC_MAX_CHUNKS 5         /* ceil(PCSC_MAX_BUFFER / PCSC_CHUNK) */
#define PCSC_INLINE 512           /* a phase's record carries a buffer shorter than this */
#define PCSC_NO_FIELD 0xFFFF      /* struct pcsc_buffer.field: no buffer */
#define PCSC_MAX_STRING 512       /* one C string (reader names are <= 128) */
#define PCSC_MAX_READERS 32       /* SCARD_READERSTATE entries captured */
#define PCSC_READERSTATE_SIZE 80  /* sizeof(SCARD_READERSTATE) on LP64 */
#define PCSC_AUTOALLOCATE 0xFFFFFFFFFFFFFFFFULL /* (DWORD)-1 */

enum pcsc_record_kind {
	PCSC_REC_ENTER = 1,
	PCSC_REC_RETURN = 2,
	PCSC_REC_DATA = 3,
	PCSC_REC_ABORT = 4,       /* the thread ended inside the call */
	PCSC_REC_LOADED = 5,      /* a process loaded libraries (struct pcsc_head only) */
	PCSC_REC_EXEC = 6,        /* a process started a program (struct pcsc_head only) */
};

/* Counters the kernel side keeps, per CPU, in the `counts` array. */
enum pcsc_count {
	PCSC_COUNT_SINCE_WAKEUP = 0,  /* ring buffer: bytes since user space was woken */
	PCSC_COUNT_LOST = 1,          /* call records that did not fit */
	PCSC_COUNT_LOADS_LOST = 2,    /* library-load records that did not fit */
	PCSC_COUNTS = 3,
};

/* struct pcsc_buffer flags (DATA records, and a call record's buffer) */
enum pcsc_data_flags {
	PCSC_DATA_NULL = 1,       /* the pointer was NULL: nothing read */
	PCSC_DATA_FAULT = 2,      /* the memory could not be read */
	PCSC_DATA_TRUNCATED = 4,  /* longer than the capture limit */
};

struct pcsc_head {
	__u64 ts;                 /* CLOCK_MONOTONIC ns of this phase */
	__u64 call_ts;            /* ts of the call's entry: (tid, call_ts) names the call */
	__u32 pid;
	__u32 tid;
	__u16 kind;               /* enum pcsc_record_kind */
	__u16 func;               /* index in the function table */
	char comm[PCSC_COMM_LEN];
};

/* Which bytes of which captured buffer a record carries (in its data[]). */
struct pcsc_buffer {
	__u32 total;              /* length of the whole buffer */
	__u32 offset;             /* of these bytes in the buffer */
	__u16 len;                /* bytes in data[]: at most PCSC_CHUNK */
	__u16 field;              /* index of the capture in the function's row */
	__u16 index;              /* element (reader names of SCARD_READERSTATE) */
	__u16 flags;              /* enum pcsc_data_flags */
};

/* ENTER and RETURN: the call's registers and the words read through its
 * pointer arguments (bit i of `valid` says words[i] was read), and the
 * phase's first short buffer (buf.field is PCSC_NO_FIELD when there is
 * none).  Sent up to data[buf.len]. */
struct pcsc_call {
	struct pcsc_head head;
	__s64 rv;                 /* RETURN only */
	__u32 valid;
	__u32 depth;              /* nesting of SCard* calls on this thread */
	__u64 args[PCSC_MAX_ARGS];
	__u64 words[PCSC_MAX_WORDS];
	struct pcsc_buffer buf;
	__u8 data[PCSC_INLINE];
};

/* A buffer, or a chunk of one.  Sent up to data[buf.len]. */
struct pcsc_data {
	struct pcsc_head head;
	struct pcsc_buffer buf;
	__u8 data[PCSC_CHUNK];
};

#endif
