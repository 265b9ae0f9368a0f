/*
 * pcsc_client.c - deterministic PC/SC test client for the eBPF PC/SC tracer.
 *
 * Build:
 *   gcc -O0 -g -Wall -Wextra -I/usr/include/PCSC tests/clients/pcsc_client.c \
 *       -o pcsc_client -lpcsclite -lpthread
 *
 * Usage: pcsc_client SCENARIO [ARGS]   (see tests/clients/README.md)
 *
 * Every PC/SC call prints one line "FUNC rv=0x%08lX" on stdout.  The exit
 * status is 0 when the scenario ran as planned (expected errors included),
 * 1 otherwise, 2 on a usage error.  Every call is made with the same
 * arguments in the same order on every run; output variables and receive
 * buffers are reset to fixed values before each call so that the "input"
 * side of a trace is deterministic too.
 *
 * Environment: PCSC_CLIENT_QUIET=1 suppresses the per-call lines of the
 * repeated calls of the `loop`, `isvalid` and `threads` scenarios (the
 * calls around them are still printed).  PCSC_CLIENT_LATENCIES=FILE: the
 * `loop` scenario writes each SCardTransmit's time to FILE, in ns, one per
 * line (the benchmark reads how the calls' times spread, not just their mean).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <winscard.h>
#include <reader.h>

#define BOGUS_HANDLE 0x1234
#define ANY_RV ((LONG)0x7FFFFFFF) /* "any rv is fine" marker */

static int failures;
static int quiet_repeats;
static pthread_mutex_t fail_lock = PTHREAD_MUTEX_INITIALIZER;

/* ------------------------------------------------------------------ */
/* reporting                                                           */

static void fail(const char *fmt, const char *what)
{
	pthread_mutex_lock(&fail_lock);
	failures++;
	pthread_mutex_unlock(&fail_lock);
	fprintf(stderr, fmt, what);
}

/* Print the call line; check rv against one expected value (or ANY_RV). */
static LONG report(const char *func, LONG rv, LONG expected)
{
	printf("%s rv=0x%08lX\n", func, (unsigned long)rv);
	if (expected != ANY_RV && rv != expected) {
		pthread_mutex_lock(&fail_lock);
		failures++;
		pthread_mutex_unlock(&fail_lock);
		fprintf(stderr, "UNEXPECTED: %s returned 0x%08lX (%s), expected 0x%08lX\n",
			func, (unsigned long)rv, pcsc_stringify_error(rv),
			(unsigned long)expected);
	}
	return rv;
}

static const SCARD_IO_REQUEST *pci_for(DWORD proto)
{
	return proto == SCARD_PROTOCOL_T0 ? SCARD_PCI_T0 : SCARD_PCI_T1;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
}

static long parse_count(const char *s, const char *what)
{
	char *end = NULL;
	long v;
	if (s == NULL) {
		fprintf(stderr, "missing argument: %s\n", what);
		exit(2);
	}
	v = strtol(s, &end, 10);
	if (*s == '\0' || *end != '\0' || v < 0) {
		fprintf(stderr, "bad %s: %s\n", what, s);
		exit(2);
	}
	return v;
}

/* ------------------------------------------------------------------ */
/* APDUs                                                               */

static const BYTE APDU_SELECT[] = { 0x00, 0xA4, 0x04, 0x00, 0x07,
	0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00 };
static const BYTE APDU_GET_CHALLENGE[] = { 0x00, 0x84, 0x00, 0x00, 0x08 };

/* Builds 80 10 00 00 00 HH LL <data>; data byte i = (i * mul) & 0xFF.
 * Returns the APDU length. */
static DWORD build_echo(BYTE *apdu, DWORD ndata, unsigned mul)
{
	DWORD i;
	apdu[0] = 0x80; apdu[1] = 0x10; apdu[2] = 0x00; apdu[3] = 0x00;
	apdu[4] = 0x00;
	apdu[5] = (BYTE)(ndata >> 8);
	apdu[6] = (BYTE)(ndata & 0xFF);
	for (i = 0; i < ndata; i++)
		apdu[7 + i] = (BYTE)((i * mul) & 0xFF);
	return 7 + ndata;
}

static int check_echo(const BYTE *apdu, DWORD ndata, const BYTE *resp, DWORD rlen)
{
	if (rlen != ndata + 2)
		return 0;
	if (memcmp(resp, apdu + 7, ndata) != 0)
		return 0;
	return resp[ndata] == 0x90 && resp[ndata + 1] == 0x00;
}

static int check_sw9000(const BYTE *resp, DWORD rlen, DWORD expect_len)
{
	return rlen == expect_len && resp[rlen - 2] == 0x90 && resp[rlen - 1] == 0x00;
}

/* Shared big buffers (extended APDUs). */
static BYTE g_send[MAX_BUFFER_SIZE_EXTENDED];
static BYTE g_recv[MAX_BUFFER_SIZE_EXTENDED];

/* ------------------------------------------------------------------ */
/* common steps                                                        */

/* Reader name of the first reader, from one ListReaders call with a
 * caller buffer. */
static char g_reader[4096];

static int get_first_reader(SCARDCONTEXT hContext)
{
	static char readers[4096];
	DWORD cch = sizeof readers;
	LONG rv;

	memset(readers, 0, sizeof readers);
	rv = report("SCardListReaders",
		    SCardListReaders(hContext, NULL, readers, &cch),
		    SCARD_S_SUCCESS);
	if (rv != SCARD_S_SUCCESS || readers[0] == '\0') {
		fail("%s\n", "no reader found");
		return -1;
	}
	memcpy(g_reader, readers, sizeof g_reader);
	g_reader[sizeof g_reader - 1] = '\0';
	return 0;
}

static LONG establish(SCARDCONTEXT *ph)
{
	*ph = 0;
	return report("SCardEstablishContext",
		      SCardEstablishContext(SCARD_SCOPE_SYSTEM, NULL, NULL, ph),
		      SCARD_S_SUCCESS);
}

static LONG connect_shared(SCARDCONTEXT hContext, SCARDHANDLE *phCard, DWORD *pProto)
{
	*phCard = 0;
	*pProto = 0;
	return report("SCardConnect",
		      SCardConnect(hContext, g_reader, SCARD_SHARE_SHARED,
				   SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1,
				   phCard, pProto),
		      SCARD_S_SUCCESS);
}

/* GET CHALLENGE 8 with a caller buffer; checks the 10-byte answer. */
static LONG transmit_get_challenge(SCARDHANDLE hCard, DWORD proto, int print)
{
	BYTE resp[258];
	DWORD rlen = sizeof resp;
	SCARD_IO_REQUEST recvPci = { SCARD_PROTOCOL_UNDEFINED, sizeof(SCARD_IO_REQUEST) };
	LONG rv;

	memset(resp, 0, sizeof resp);
	rv = SCardTransmit(hCard, pci_for(proto), APDU_GET_CHALLENGE,
			   sizeof APDU_GET_CHALLENGE, &recvPci, resp, &rlen);
	if (print)
		report("SCardTransmit", rv, SCARD_S_SUCCESS);
	else if (rv != SCARD_S_SUCCESS)
		report("SCardTransmit", rv, SCARD_S_SUCCESS);
	if (rv == SCARD_S_SUCCESS && !check_sw9000(resp, rlen, 10))
		fail("%s\n", "GET CHALLENGE: bad response");
	return rv;
}

/* ------------------------------------------------------------------ */
/* scenario: all                                                       */

static int scenario_all(void)
{
	SCARDCONTEXT hContext = 0;
	SCARDHANDLE hCard = 0;
	DWORD dwActiveProtocol = 0;
	LONG rv;

	if (establish(&hContext) != SCARD_S_SUCCESS)
		return 1;

	report("SCardIsValidContext", SCardIsValidContext(hContext), SCARD_S_SUCCESS);

	/* ListReaderGroups, auto-allocated */
	{
		LPSTR mszGroups = NULL;
		DWORD cchGroups = SCARD_AUTOALLOCATE;
		rv = report("SCardListReaderGroups",
			    SCardListReaderGroups(hContext, (LPSTR)&mszGroups, &cchGroups),
			    SCARD_S_SUCCESS);
		if (rv == SCARD_S_SUCCESS)
			report("SCardFreeMemory", SCardFreeMemory(hContext, mszGroups),
			       SCARD_S_SUCCESS);
	}

	/* ListReaders: size query, then a caller buffer */
	{
		static char readers[4096];
		DWORD cchReaders = 0;
		rv = report("SCardListReaders",
			    SCardListReaders(hContext, NULL, NULL, &cchReaders),
			    SCARD_S_SUCCESS);
		if (rv != SCARD_S_SUCCESS)
			return 1;
		if (cchReaders > sizeof readers) {
			fail("%s\n", "reader list too long");
			return 1;
		}
		memset(readers, 0, sizeof readers);
		rv = report("SCardListReaders",
			    SCardListReaders(hContext, NULL, readers, &cchReaders),
			    SCARD_S_SUCCESS);
		if (rv != SCARD_S_SUCCESS || readers[0] == '\0') {
			fail("%s\n", "no reader found");
			return 1;
		}
		memcpy(g_reader, readers, sizeof g_reader);
		g_reader[sizeof g_reader - 1] = '\0';
	}

	/* ListReaders, auto-allocated */
	{
		LPSTR mszReaders = NULL;
		DWORD cchReaders = SCARD_AUTOALLOCATE;
		rv = report("SCardListReaders",
			    SCardListReaders(hContext, NULL, (LPSTR)&mszReaders, &cchReaders),
			    SCARD_S_SUCCESS);
		if (rv == SCARD_S_SUCCESS)
			report("SCardFreeMemory", SCardFreeMemory(hContext, mszReaders),
			       SCARD_S_SUCCESS);
	}

	/* GetStatusChange, one reader, UNAWARE, timeout 0 */
	{
		SCARD_READERSTATE rs;
		memset(&rs, 0, sizeof rs);
		rs.szReader = g_reader;
		rs.pvUserData = NULL;
		rs.dwCurrentState = SCARD_STATE_UNAWARE;
		report("SCardGetStatusChange",
		       SCardGetStatusChange(hContext, 0, &rs, 1), SCARD_S_SUCCESS);
	}

	if (connect_shared(hContext, &hCard, &dwActiveProtocol) != SCARD_S_SUCCESS)
		return 1;

	/* Status, caller buffers */
	{
		char szReader[256];
		DWORD cchReader = sizeof szReader;
		DWORD dwState = 0, dwProtocol = 0;
		BYTE atr[MAX_ATR_SIZE];
		DWORD cbAtr = sizeof atr;
		memset(szReader, 0, sizeof szReader);
		memset(atr, 0, sizeof atr);
		report("SCardStatus",
		       SCardStatus(hCard, szReader, &cchReader, &dwState, &dwProtocol,
				   atr, &cbAtr),
		       SCARD_S_SUCCESS);
	}

	/* Status, auto-allocated name and ATR */
	{
		LPSTR szReader = NULL;
		DWORD cchReader = SCARD_AUTOALLOCATE;
		DWORD dwState = 0, dwProtocol = 0;
		LPBYTE atr = NULL;
		DWORD cbAtr = SCARD_AUTOALLOCATE;
		rv = report("SCardStatus",
			    SCardStatus(hCard, (LPSTR)&szReader, &cchReader, &dwState,
					&dwProtocol, (LPBYTE)&atr, &cbAtr),
			    SCARD_S_SUCCESS);
		if (rv == SCARD_S_SUCCESS) {
			report("SCardFreeMemory", SCardFreeMemory(hContext, szReader),
			       SCARD_S_SUCCESS);
			report("SCardFreeMemory", SCardFreeMemory(hContext, atr),
			       SCARD_S_SUCCESS);
		}
	}

	report("SCardBeginTransaction", SCardBeginTransaction(hCard), SCARD_S_SUCCESS);

	/* Transmit SELECT, with a receive PCI */
	{
		BYTE resp[258];
		DWORD rlen = sizeof resp;
		SCARD_IO_REQUEST recvPci = { SCARD_PROTOCOL_UNDEFINED, sizeof(SCARD_IO_REQUEST) };
		memset(resp, 0, sizeof resp);
		rv = report("SCardTransmit",
			    SCardTransmit(hCard, pci_for(dwActiveProtocol), APDU_SELECT,
					  sizeof APDU_SELECT, &recvPci, resp, &rlen),
			    SCARD_S_SUCCESS);
		if (rv == SCARD_S_SUCCESS && !check_sw9000(resp, rlen, 2))
			fail("%s\n", "SELECT: bad response");
	}

	/* Transmit GET CHALLENGE 8 */
	transmit_get_challenge(hCard, dwActiveProtocol, 1);

	/* Transmit extended ECHO, 4096 data bytes */
	{
		DWORD slen = build_echo(g_send, 4096, 1);
		DWORD rlen = sizeof g_recv;
		SCARD_IO_REQUEST recvPci = { SCARD_PROTOCOL_UNDEFINED, sizeof(SCARD_IO_REQUEST) };
		memset(g_recv, 0, sizeof g_recv);
		rv = report("SCardTransmit",
			    SCardTransmit(hCard, pci_for(dwActiveProtocol), g_send, slen,
					  &recvPci, g_recv, &rlen),
			    SCARD_S_SUCCESS);
		if (rv == SCARD_S_SUCCESS && !check_echo(g_send, 4096, g_recv, rlen))
			fail("%s\n", "ECHO 4096: bad response");
	}

	report("SCardEndTransaction", SCardEndTransaction(hCard, SCARD_LEAVE_CARD),
	       SCARD_S_SUCCESS);

	/* GetAttrib ATR string, caller buffer */
	{
		BYTE attr[MAX_ATR_SIZE];
		DWORD cbAttr = sizeof attr;
		memset(attr, 0, sizeof attr);
		/* vpcd does not know SCARD_ATTR_ATR_STRING (only TAG_IFD_ATR):
		 * driver-dependent, any rv is accepted */
		report("SCardGetAttrib",
		       SCardGetAttrib(hCard, SCARD_ATTR_ATR_STRING, attr, &cbAttr),
		       ANY_RV);
	}

	/* GetAttrib vendor name, auto-allocated (the reader may not know it) */
	{
		LPBYTE attr = NULL;
		DWORD cbAttr = SCARD_AUTOALLOCATE;
		rv = report("SCardGetAttrib",
			    SCardGetAttrib(hCard, SCARD_ATTR_VENDOR_NAME, (LPBYTE)&attr, &cbAttr),
			    ANY_RV);
		if (rv == SCARD_S_SUCCESS)
			report("SCardFreeMemory", SCardFreeMemory(hContext, attr),
			       SCARD_S_SUCCESS);
	}

	/* SetAttrib: an error is expected */
	{
		static const BYTE name[4] = { 'A', 'B', 'C', 'D' };
		report("SCardSetAttrib",
		       SCardSetAttrib(hCard, SCARD_ATTR_DEVICE_FRIENDLY_NAME_A, name,
				      sizeof name),
		       ANY_RV);
	}

	/* Control GET_FEATURE_REQUEST: an error is fine */
	{
		BYTE out[256];
		DWORD bytesReturned = 0;
		memset(out, 0, sizeof out);
		report("SCardControl",
		       SCardControl(hCard, CM_IOCTL_GET_FEATURE_REQUEST, NULL, 0,
				    out, sizeof out, &bytesReturned),
		       ANY_RV);
	}

	dwActiveProtocol = 0;
	report("SCardReconnect",
	       SCardReconnect(hCard, SCARD_SHARE_SHARED,
			      SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1, SCARD_RESET_CARD,
			      &dwActiveProtocol),
	       SCARD_S_SUCCESS);

	report("SCardDisconnect", SCardDisconnect(hCard, SCARD_LEAVE_CARD), SCARD_S_SUCCESS);
	report("SCardCancel", SCardCancel(hContext), SCARD_S_SUCCESS);
	report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_S_SUCCESS);
	return failures ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* scenario: errors                                                    */

static int scenario_errors(void)
{
	SCARDCONTEXT hContext = 0;
	SCARDHANDLE hCard = 0;
	DWORD dwActiveProtocol = 0;

	if (establish(&hContext) != SCARD_S_SUCCESS)
		return 1;

	report("SCardIsValidContext", SCardIsValidContext(BOGUS_HANDLE),
	       SCARD_E_INVALID_HANDLE);

	{
		SCARDHANDLE h = 0;
		DWORD proto = 0;
		report("SCardConnect",
		       SCardConnect(hContext, "No Such Reader", SCARD_SHARE_SHARED,
				    SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1, &h, &proto),
		       SCARD_E_UNKNOWN_READER);
	}

	{
		BYTE resp[258];
		DWORD rlen = sizeof resp;
		SCARD_IO_REQUEST recvPci = { SCARD_PROTOCOL_UNDEFINED, sizeof(SCARD_IO_REQUEST) };
		memset(resp, 0, sizeof resp);
		report("SCardTransmit",
		       SCardTransmit(BOGUS_HANDLE, SCARD_PCI_T1, APDU_GET_CHALLENGE,
				     sizeof APDU_GET_CHALLENGE, &recvPci, resp, &rlen),
		       SCARD_E_INVALID_HANDLE);
	}

	/* ListReaders into a 2-byte buffer.  The buffers of the "too small"
	 * calls are 2 bytes followed by zeros, so that a tracer that reads
	 * them as C strings after the failed call sees the same bytes on
	 * every run. */
	{
		char small[16];
		DWORD cch = 2;
		memset(small, 0, sizeof small);
		report("SCardListReaders",
		       SCardListReaders(hContext, NULL, small, &cch),
		       SCARD_E_INSUFFICIENT_BUFFER);
	}

	/* The real reader name, for the calls that need a card. */
	if (get_first_reader(hContext) != 0)
		return 1;
	if (connect_shared(hContext, &hCard, &dwActiveProtocol) != SCARD_S_SUCCESS)
		return 1;

	/* Status with a 2-byte reader name buffer */
	{
		char szReader[16];
		DWORD cchReader = 2;
		DWORD dwState = 0, dwProtocol = 0;
		BYTE atr[MAX_ATR_SIZE];
		DWORD cbAtr = sizeof atr;
		memset(szReader, 0, sizeof szReader);
		memset(atr, 0, sizeof atr);
		report("SCardStatus",
		       SCardStatus(hCard, szReader, &cchReader, &dwState, &dwProtocol,
				   atr, &cbAtr),
		       SCARD_E_INSUFFICIENT_BUFFER);
	}

	/* GET CHALLENGE 8 into a 2-byte receive buffer */
	{
		BYTE resp[16];
		DWORD rlen = 2;
		SCARD_IO_REQUEST recvPci = { SCARD_PROTOCOL_UNDEFINED, sizeof(SCARD_IO_REQUEST) };
		memset(resp, 0, sizeof resp);
		report("SCardTransmit",
		       SCardTransmit(hCard, pci_for(dwActiveProtocol), APDU_GET_CHALLENGE,
				     sizeof APDU_GET_CHALLENGE, &recvPci, resp, &rlen),
		       SCARD_E_INSUFFICIENT_BUFFER);
	}

	report("SCardDisconnect", SCardDisconnect(BOGUS_HANDLE, SCARD_LEAVE_CARD),
	       SCARD_E_INVALID_HANDLE);
	report("SCardDisconnect", SCardDisconnect(hCard, SCARD_LEAVE_CARD), SCARD_S_SUCCESS);
	report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_S_SUCCESS);
	report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_E_INVALID_HANDLE);
	return failures ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* scenario: nullrecvpci                                               */

static int scenario_nullrecvpci(void)
{
	SCARDCONTEXT hContext = 0;
	SCARDHANDLE hCard = 0;
	DWORD dwActiveProtocol = 0;
	LONG rv;

	if (establish(&hContext) != SCARD_S_SUCCESS)
		return 1;
	if (get_first_reader(hContext) != 0)
		return 1;
	if (connect_shared(hContext, &hCard, &dwActiveProtocol) != SCARD_S_SUCCESS)
		return 1;
	{
		BYTE resp[258];
		DWORD rlen = sizeof resp;
		memset(resp, 0, sizeof resp);
		rv = report("SCardTransmit",
			    SCardTransmit(hCard, pci_for(dwActiveProtocol), APDU_SELECT,
					  sizeof APDU_SELECT, NULL, resp, &rlen),
			    SCARD_S_SUCCESS);
		if (rv == SCARD_S_SUCCESS && !check_sw9000(resp, rlen, 2))
			fail("%s\n", "SELECT: bad response");
	}
	report("SCardDisconnect", SCardDisconnect(hCard, SCARD_LEAVE_CARD), SCARD_S_SUCCESS);
	report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_S_SUCCESS);
	return failures ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* scenario: extended65k                                               */

static int scenario_extended65k(void)
{
	SCARDCONTEXT hContext = 0;
	SCARDHANDLE hCard = 0;
	DWORD dwActiveProtocol = 0;
	LONG rv;

	if (establish(&hContext) != SCARD_S_SUCCESS)
		return 1;
	if (get_first_reader(hContext) != 0)
		return 1;
	if (connect_shared(hContext, &hCard, &dwActiveProtocol) != SCARD_S_SUCCESS)
		return 1;
	report("SCardBeginTransaction", SCardBeginTransaction(hCard), SCARD_S_SUCCESS);
	{
		DWORD slen = build_echo(g_send, 65000, 7);
		DWORD rlen = sizeof g_recv;
		SCARD_IO_REQUEST recvPci = { SCARD_PROTOCOL_UNDEFINED, sizeof(SCARD_IO_REQUEST) };
		memset(g_recv, 0, sizeof g_recv);
		rv = report("SCardTransmit",
			    SCardTransmit(hCard, pci_for(dwActiveProtocol), g_send, slen,
					  &recvPci, g_recv, &rlen),
			    SCARD_S_SUCCESS);
		if (rv == SCARD_S_SUCCESS && check_echo(g_send, 65000, g_recv, rlen))
			printf("echo ok\n");
		else
			fail("ECHO 65000: bad response (%s)\n",
			     rv == SCARD_S_SUCCESS ? "content" : "rv");
	}
	report("SCardEndTransaction", SCardEndTransaction(hCard, SCARD_LEAVE_CARD),
	       SCARD_S_SUCCESS);
	report("SCardDisconnect", SCardDisconnect(hCard, SCARD_LEAVE_CARD), SCARD_S_SUCCESS);
	report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_S_SUCCESS);
	return failures ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* scenario: nullargs                                                  */

static int scenario_nullargs(void)
{
	SCARDCONTEXT hContext = 0;
	SCARDHANDLE hCard = 0;
	DWORD dwActiveProtocol = 0;

	if (establish(&hContext) != SCARD_S_SUCCESS)
		return 1;

	/* mszReaders NULL and pcchReaders NULL: an error (invalid parameter) */
	report("SCardListReaders", SCardListReaders(hContext, NULL, NULL, NULL),
	       SCARD_E_INVALID_PARAMETER);

	if (get_first_reader(hContext) != 0)
		return 1;
	if (connect_shared(hContext, &hCard, &dwActiveProtocol) != SCARD_S_SUCCESS)
		return 1;

	/* Status with every output pointer NULL */
	report("SCardStatus", SCardStatus(hCard, NULL, NULL, NULL, NULL, NULL, NULL),
	       SCARD_S_SUCCESS);

	/* GetStatusChange with no reader */
	report("SCardGetStatusChange", SCardGetStatusChange(hContext, 0, NULL, 0),
	       SCARD_S_SUCCESS);

	report("SCardFreeMemory", SCardFreeMemory(hContext, NULL), SCARD_S_SUCCESS);

	report("SCardDisconnect", SCardDisconnect(hCard, SCARD_LEAVE_CARD), SCARD_S_SUCCESS);
	report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_S_SUCCESS);
	return failures ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* scenario: attrs                                                     */

/* TAG_IFD_ATR (ifdhandler.h): the one attribute vpcd answers through
 * SCardGetAttrib (pcscd passes the tag to the driver unchanged). */
#define ATTR_TAG_IFD_ATR 0x0303

static int scenario_attrs(void)
{
	SCARDCONTEXT hContext = 0;
	SCARDHANDLE hCard = 0;
	DWORD dwActiveProtocol = 0;
	LONG rv;

	if (establish(&hContext) != SCARD_S_SUCCESS)
		return 1;
	if (get_first_reader(hContext) != 0)
		return 1;
	if (connect_shared(hContext, &hCard, &dwActiveProtocol) != SCARD_S_SUCCESS)
		return 1;

	/* size query */
	{
		DWORD cbAttr = 0;
		rv = report("SCardGetAttrib",
			    SCardGetAttrib(hCard, ATTR_TAG_IFD_ATR, NULL, &cbAttr),
			    SCARD_S_SUCCESS);
		if (rv == SCARD_S_SUCCESS && cbAttr != 5)
			fail("%s\n", "attrs: ATR size query: length is not 5");
	}
	/* caller buffer */
	{
		static const BYTE atr[5] = { 0x3B, 0x80, 0x80, 0x01, 0x01 };
		BYTE attr[MAX_ATR_SIZE];
		DWORD cbAttr = sizeof attr;
		memset(attr, 0, sizeof attr);
		rv = report("SCardGetAttrib",
			    SCardGetAttrib(hCard, ATTR_TAG_IFD_ATR, attr, &cbAttr),
			    SCARD_S_SUCCESS);
		if (rv == SCARD_S_SUCCESS && (cbAttr != 5 || memcmp(attr, atr, 5) != 0))
			fail("%s\n", "attrs: ATR differs from 3B 80 80 01 01");
	}
	/* auto-allocated */
	{
		LPBYTE attr = NULL;
		DWORD cbAttr = SCARD_AUTOALLOCATE;
		rv = report("SCardGetAttrib",
			    SCardGetAttrib(hCard, ATTR_TAG_IFD_ATR, (LPBYTE)&attr, &cbAttr),
			    SCARD_S_SUCCESS);
		if (rv == SCARD_S_SUCCESS)
			report("SCardFreeMemory", SCardFreeMemory(hContext, attr),
			       SCARD_S_SUCCESS);
	}
	/* caller buffer too small */
	{
		BYTE attr[16];
		DWORD cbAttr = 2;
		memset(attr, 0, sizeof attr);
		report("SCardGetAttrib",
		       SCardGetAttrib(hCard, ATTR_TAG_IFD_ATR, attr, &cbAttr),
		       SCARD_E_INSUFFICIENT_BUFFER);
	}

	report("SCardDisconnect", SCardDisconnect(hCard, SCARD_LEAVE_CARD), SCARD_S_SUCCESS);
	report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_S_SUCCESS);
	return failures ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* scenario: loop N                                                    */

static int scenario_loop(long n)
{
	SCARDCONTEXT hContext = 0;
	SCARDHANDLE hCard = 0;
	DWORD dwActiveProtocol = 0;
	double t0, t1;
	long i;

	if (establish(&hContext) != SCARD_S_SUCCESS)
		return 1;
	if (get_first_reader(hContext) != 0)
		return 1;
	if (connect_shared(hContext, &hCard, &dwActiveProtocol) != SCARD_S_SUCCESS)
		return 1;
	const char *latencies_path = getenv("PCSC_CLIENT_LATENCIES");
	/* Kept in memory during the loop: writing them as they come would
	 * add to the times measured. */
	double *latencies = latencies_path ? calloc(n ? n : 1, sizeof(*latencies)) : NULL;

	if (latencies_path && !latencies)
		fail("%s\n", "no memory for the latencies");
	t0 = now_s();
	for (i = 0; i < n; i++) {
		double start = latencies ? now_s() : 0;

		if (transmit_get_challenge(hCard, dwActiveProtocol, !quiet_repeats)
		    != SCARD_S_SUCCESS)
			break;
		if (latencies)
			latencies[i] = now_s() - start;
	}
	t1 = now_s();
	report("SCardDisconnect", SCardDisconnect(hCard, SCARD_LEAVE_CARD), SCARD_S_SUCCESS);
	report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_S_SUCCESS);
	fprintf(stderr, "loop: %ld transmits in %.6f s (%.3f us/call)\n", i, t1 - t0,
		i ? (t1 - t0) * 1e6 / i : 0.0);
	if (latencies) {
		FILE *f = fopen(latencies_path, "w");
		int bad = !f;

		if (f) {
			for (long k = 0; k < i; k++)
				fprintf(f, "%.0f\n", latencies[k] * 1e9);
			bad = ferror(f);
			if (fclose(f) != 0)
				bad = 1;
		}
		if (bad)
			fail("cannot write the latencies to %s\n", latencies_path);
		free(latencies);
	}
	return failures ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* scenario: isvalid N                                                 */

static int scenario_isvalid(long n)
{
	SCARDCONTEXT hContext = 0;
	double t0, t1;
	long i;

	if (establish(&hContext) != SCARD_S_SUCCESS)
		return 1;
	t0 = now_s();
	for (i = 0; i < n; i++) {
		LONG rv = SCardIsValidContext(hContext);
		if (!quiet_repeats || rv != SCARD_S_SUCCESS)
			report("SCardIsValidContext", rv, SCARD_S_SUCCESS);
	}
	t1 = now_s();
	report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_S_SUCCESS);
	fprintf(stderr, "isvalid: %ld calls in %.6f s (%.3f us/call)\n", n, t1 - t0,
		n ? (t1 - t0) * 1e6 / n : 0.0);
	return failures ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* scenario: blocked                                                   */

struct blocked_arg {
	SCARDCONTEXT hContext;
	DWORD dwCurrentState;
	LONG rv;
	volatile int returned;
};

static void *blocked_thread(void *p)
{
	struct blocked_arg *a = p;
	SCARD_READERSTATE rs;

	memset(&rs, 0, sizeof rs);
	rs.szReader = g_reader;
	rs.pvUserData = NULL;
	rs.dwCurrentState = a->dwCurrentState;
	a->rv = SCardGetStatusChange(a->hContext, INFINITE, &rs, 1);
	__atomic_store_n(&a->returned, 1, __ATOMIC_SEQ_CST);
	return NULL;
}

static int scenario_blocked(void)
{
	SCARDCONTEXT hContext = 0;
	struct blocked_arg arg;
	pthread_t th;
	struct timespec deadline;
	LONG rv, rvCancel;
	int returned_early;

	if (establish(&hContext) != SCARD_S_SUCCESS)
		return 1;
	if (get_first_reader(hContext) != 0)
		return 1;

	/* Learn the current state. */
	{
		SCARD_READERSTATE rs;
		memset(&rs, 0, sizeof rs);
		rs.szReader = g_reader;
		rs.pvUserData = NULL;
		rs.dwCurrentState = SCARD_STATE_UNAWARE;
		rv = report("SCardGetStatusChange",
			    SCardGetStatusChange(hContext, 0, &rs, 1), SCARD_S_SUCCESS);
		if (rv != SCARD_S_SUCCESS)
			return 1;
		memset(&arg, 0, sizeof arg);
		arg.hContext = hContext;
		/* The current state without SCARD_STATE_CHANGED and without the
		 * event counter (high 16 bits): pcsc-lite still blocks on it, and
		 * the argument stays the same from run to run. */
		arg.dwCurrentState = rs.dwEventState & 0xFFFF & ~(DWORD)SCARD_STATE_CHANGED;
	}

	if (pthread_create(&th, NULL, blocked_thread, &arg) != 0) {
		fail("%s\n", "pthread_create failed");
		return 1;
	}
	sleep_ms(300);
	returned_early = __atomic_load_n(&arg.returned, __ATOMIC_SEQ_CST);
	rvCancel = SCardCancel(hContext);

	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += 10;
	if (pthread_timedjoin_np(th, NULL, &deadline) != 0) {
		report("SCardCancel", rvCancel, SCARD_S_SUCCESS);
		fail("%s\n", "blocked: SCardGetStatusChange did not return after SCardCancel");
		fflush(stdout);
		_exit(1);
	}
	/* Printed after the join, in a fixed order: the blocked call's
	 * line first, then SCardCancel's. */
	report("SCardGetStatusChange", arg.rv, SCARD_E_CANCELLED);
	report("SCardCancel", rvCancel, SCARD_S_SUCCESS);
	if (returned_early)
		fail("%s\n", "blocked: SCardGetStatusChange returned before SCardCancel");

	report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_S_SUCCESS);
	return failures ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* scenario: threads T N                                               */

static long g_thread_n;

static void *worker_thread(void *p)
{
	SCARDCONTEXT hContext = 0;
	SCARDHANDLE hCard = 0;
	DWORD dwActiveProtocol = 0;
	long i;

	(void)p;
	if (establish(&hContext) != SCARD_S_SUCCESS)
		return NULL;
	if (connect_shared(hContext, &hCard, &dwActiveProtocol) == SCARD_S_SUCCESS) {
		for (i = 0; i < g_thread_n; i++)
			if (transmit_get_challenge(hCard, dwActiveProtocol, !quiet_repeats)
			    != SCARD_S_SUCCESS)
				break;
		report("SCardDisconnect", SCardDisconnect(hCard, SCARD_LEAVE_CARD),
		       SCARD_S_SUCCESS);
	}
	report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_S_SUCCESS);
	return NULL;
}

static int scenario_threads(long t, long n)
{
	SCARDCONTEXT hContext = 0;
	pthread_t *th;
	long i, started = 0;
	double t0, t1;

	if (establish(&hContext) != SCARD_S_SUCCESS)
		return 1;
	if (get_first_reader(hContext) != 0)
		return 1;
	g_thread_n = n;
	th = calloc(t ? t : 1, sizeof *th);
	if (th == NULL)
		return 1;
	t0 = now_s();
	for (i = 0; i < t; i++) {
		if (pthread_create(&th[i], NULL, worker_thread, NULL) != 0) {
			fail("%s\n", "pthread_create failed");
			break;
		}
		started++;
	}
	for (i = 0; i < started; i++)
		pthread_join(th[i], NULL);
	t1 = now_s();
	free(th);
	report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_S_SUCCESS);
	fprintf(stderr, "threads: %ld x %ld transmits in %.6f s\n", t, n, t1 - t0);
	return failures ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* scenario: main-exits-first: the main thread ends (pthread_exit), and  */
/* another thread, once it has, waits for a line on stdin, makes its     */
/* calls, then ends the process.                                        */

static pthread_t main_thread;

static void *late_thread(void *p)
{
	SCARDCONTEXT hContext = 0;
	char line[16];

	(void)p;
	/* Returns once the main thread has ended: a joinable thread, even
	 * when it ends with pthread_exit(). */
	if (pthread_join(main_thread, NULL) != 0)
		fail("%s\n", "pthread_join of the main thread failed");
	/* A test may look at the process in between. */
	if (!fgets(line, sizeof(line), stdin))
		fail("%s\n", "no line on stdin");
	if (establish(&hContext) == SCARD_S_SUCCESS) {
		report("SCardIsValidContext", SCardIsValidContext(hContext), SCARD_S_SUCCESS);
		report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_S_SUCCESS);
	}
	fflush(stdout);
	exit(failures ? 1 : 0);
}

static int scenario_main_exits_first(void)
{
	pthread_t th;

	main_thread = pthread_self();
	if (pthread_create(&th, NULL, late_thread, NULL) != 0) {
		fail("%s\n", "pthread_create failed");
		return 1;
	}
	fflush(stdout);
	pthread_exit(NULL);
}

/* ------------------------------------------------------------------ */
/* scenario: sleep MS                                                  */

static int scenario_sleep(long ms)
{
	SCARDCONTEXT hContext = 0;

	if (establish(&hContext) != SCARD_S_SUCCESS)
		return 1;
	fflush(stdout);
	sleep_ms(ms);
	report("SCardIsValidContext", SCardIsValidContext(hContext), SCARD_S_SUCCESS);
	report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_S_SUCCESS);
	return failures ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* scenario: wait-then-run                                             */

static int scenario_wait_then_run(void)
{
	char line[256];

	printf("ready\n");
	fflush(stdout);
	if (fgets(line, sizeof line, stdin) == NULL) {
		/* EOF (or a read error): run anyway */
	}
	return scenario_all();
}

/* ------------------------------------------------------------------ */

/* GetStatusChange on 16 reader states: the two vpcd readers, eight times
 * each, alternating (pcsc-lite rejects names no reader has, even when
 * they are marked SCARD_STATE_IGNORE); the last eight are IGNOREd. */
#define READERS16 16
static int scenario_readers16(void)
{
	SCARDCONTEXT hContext = 0;
	SCARD_READERSTATE rs[READERS16];
	char names[READERS16][32];
	int i;

	if (establish(&hContext) != SCARD_S_SUCCESS)
		return 1;
	if (get_first_reader(hContext) != 0)
		return 1;
	memset(rs, 0, sizeof rs);
	for (i = 0; i < READERS16; i++) {
		snprintf(names[i], sizeof names[i], "Virtual PCD 00 %02d", i % 2);
		rs[i].szReader = names[i];
		rs[i].dwCurrentState = i < 8 ? SCARD_STATE_UNAWARE : SCARD_STATE_IGNORE;
	}
	report("SCardGetStatusChange",
	       SCardGetStatusChange(hContext, 0, rs, READERS16), SCARD_S_SUCCESS);
	report("SCardReleaseContext", SCardReleaseContext(hContext), SCARD_S_SUCCESS);
	return failures ? 1 : 0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: pcsc_client SCENARIO [ARGS]\n"
		"  all | errors | nullrecvpci | extended65k | nullargs | attrs | readers16 | blocked |\n"
		"  loop N | isvalid N | threads T N | sleep MS | wait-then-run | main-exits-first\n");
}

int main(int argc, char **argv)
{
	const char *sc;
	const char *q = getenv("PCSC_CLIENT_QUIET");
	int bulk;
	int rc;

	if (argc < 2) {
		usage();
		return 2;
	}
	sc = argv[1];
	quiet_repeats = q != NULL && *q != '\0' && strcmp(q, "0") != 0;

	/* Line-buffered stdout so that a test sees each line at once (and
	 * keeps what was printed if the process dies); fully buffered for the
	 * repeated-call scenarios, which are benchmarks. */
	bulk = !strcmp(sc, "loop") || !strcmp(sc, "isvalid") || !strcmp(sc, "threads");
	setvbuf(stdout, NULL, bulk ? _IOFBF : _IOLBF, bulk ? 1 << 16 : 0);

	if (!strcmp(sc, "all"))
		rc = scenario_all();
	else if (!strcmp(sc, "errors"))
		rc = scenario_errors();
	else if (!strcmp(sc, "nullrecvpci"))
		rc = scenario_nullrecvpci();
	else if (!strcmp(sc, "extended65k"))
		rc = scenario_extended65k();
	else if (!strcmp(sc, "nullargs"))
		rc = scenario_nullargs();
	else if (!strcmp(sc, "readers16"))
		rc = scenario_readers16();
	else if (!strcmp(sc, "attrs"))
		rc = scenario_attrs();
	else if (!strcmp(sc, "loop"))
		rc = scenario_loop(parse_count(argv[2], "N"));
	else if (!strcmp(sc, "isvalid"))
		rc = scenario_isvalid(parse_count(argv[2], "N"));
	else if (!strcmp(sc, "blocked"))
		rc = scenario_blocked();
	else if (!strcmp(sc, "threads"))
		rc = scenario_threads(parse_count(argc > 2 ? argv[2] : NULL, "T"),
				      parse_count(argc > 3 ? argv[3] : NULL, "N"));
	else if (!strcmp(sc, "sleep"))
		rc = scenario_sleep(parse_count(argv[2], "MS"));
	else if (!strcmp(sc, "wait-then-run"))
		rc = scenario_wait_then_run();
	else if (!strcmp(sc, "main-exits-first"))
		rc = scenario_main_exits_first();
	else {
		usage();
		return 2;
	}
	fflush(stdout);
	if (failures && rc == 0)
		rc = 1;
	return rc;
}
