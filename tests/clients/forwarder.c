/* A library exporting the 18 SCard* functions that forwards each call to the
 * next definition (the real libpcsclite), as pcsc-lite >= 2.1's
 * libpcsclite.so.1 forwards to libpcsclite_real.so.1.  Loaded with
 * LD_PRELOAD, it puts two probed SCard* functions on the stack of every
 * application call: the tracer must still report each call once.
 *
 * Every function takes and forwards seven register-sized arguments: on
 * x86-64 that passes any SCard* signature through unchanged (DWORD, LONG,
 * handles and pointers are all 8 bytes; the 7th is on the stack). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>

typedef unsigned long A;
typedef long (*fn7)(A, A, A, A, A, A, A);

#define FORWARD(name)                                                       \
	long name(A a, A b, A c, A d, A e, A f, A g)                        \
	{                                                                   \
		static fn7 next;                                            \
		if (!next)                                                  \
			next = (fn7)dlsym(RTLD_NEXT, #name);                \
		if (!next)                                                  \
			abort();                                            \
		return next(a, b, c, d, e, f, g);                           \
	}

FORWARD(SCardEstablishContext)
FORWARD(SCardReleaseContext)
FORWARD(SCardIsValidContext)
FORWARD(SCardConnect)
FORWARD(SCardReconnect)
FORWARD(SCardDisconnect)
FORWARD(SCardBeginTransaction)
FORWARD(SCardEndTransaction)
FORWARD(SCardStatus)
FORWARD(SCardGetStatusChange)
FORWARD(SCardControl)
FORWARD(SCardTransmit)
FORWARD(SCardListReaderGroups)
FORWARD(SCardListReaders)
FORWARD(SCardFreeMemory)
FORWARD(SCardCancel)
FORWARD(SCardGetAttrib)
FORWARD(SCardSetAttrib)
