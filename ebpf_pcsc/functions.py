"""The table of the 18 PC/SC functions: one row each, saying what the probes
capture at entry and at return and how pcsc-spy's text renders the call.

Every argument register is always saved at entry (a NULL pointer is then
visible to the renderer).  The captures name what is read *through* them:

- Word:  one 64-bit word at an argument + offset (DWORD outputs, handles,
         SCARD_IO_REQUEST fields);
- Text:  a NUL-terminated string an argument points to;
- Bytes: a buffer an argument points to, whose length is another argument or
         a Word of the same phase; `autoalloc` names the entry Word which,
         when it is SCARD_AUTOALLOCATE, makes the argument a pointer to the
         buffer's pointer; `on_success` skips the read after a failed call
         (the buffer then holds stale memory);
- ReaderStates: an SCARD_READERSTATE array and the reader names.

Adding a function is adding a row (and its renderer in pcsc_text.py).
"""
from typing import Tuple

from . import pcsc_text as text
from .captures import Bytes, Function, ReaderStates, Text, Word

FUNCTIONS: Tuple[Function, ...] = (
    Function("SCardEstablishContext",
             ("dwScope", "pvReserved1", "pvReserved2", "phContext"),
             text.establish_context,
             exit=(Word("phContext", "phContext"),)),
    Function("SCardReleaseContext", ("hContext",), text.context_only),
    Function("SCardIsValidContext", ("hContext",), text.context_only),
    Function("SCardConnect",
             ("hContext", "szReader", "dwShareMode", "dwPreferredProtocols",
              "phCard", "pdwActiveProtocol"),
             text.connect,
             entry=(Text("szReader", "szReader"), Word("phCard", "phCard"),
                    Word("pdwActiveProtocol", "pdwActiveProtocol")),
             exit=(Word("phCard", "phCard"),
                   Word("pdwActiveProtocol", "pdwActiveProtocol"))),
    Function("SCardReconnect",
             ("hCard", "dwShareMode", "dwPreferredProtocols", "dwInitialization",
              "pdwActiveProtocol"),
             text.reconnect,
             exit=(Word("pdwActiveProtocol", "pdwActiveProtocol"),)),
    Function("SCardDisconnect", ("hCard", "dwDisposition"), text.card_disposition),
    Function("SCardBeginTransaction", ("hCard",), text.card_only),
    Function("SCardEndTransaction", ("hCard", "dwDisposition"), text.card_disposition),
    Function("SCardStatus",
             ("hCard", "mszReaderName", "pcchReaderLen", "pdwState", "pdwProtocol",
              "pbAtr", "pcbAtrLen"),
             text.status,
             entry=(Word("pcchReaderLen", "pcchReaderLen"), Word("pcbAtrLen", "pcbAtrLen")),
             exit=(Word("pcchReaderLen", "pcchReaderLen"), Word("pdwState", "pdwState"),
                   Word("pdwProtocol", "pdwProtocol"), Word("pcbAtrLen", "pcbAtrLen"),
                   Bytes("mszReaderName", "mszReaderName", "pcchReaderLen",
                         autoalloc="pcchReaderLen", on_success=True),
                   Bytes("pbAtr", "pbAtr", "pcbAtrLen", autoalloc="pcbAtrLen",
                         on_success=True))),
    Function("SCardGetStatusChange",
             ("hContext", "dwTimeout", "rgReaderStates", "cReaders"),
             text.get_status_change,
             entry=(ReaderStates("rgReaderStates", "rgReaderStates", "cReaders"),),
             exit=(ReaderStates("rgReaderStates", "rgReaderStates", "cReaders"),)),
    Function("SCardControl",
             ("hCard", "dwControlCode", "pbSendBuffer", "cbSendLength",
              "pbRecvBuffer", "cbRecvLength", "lpBytesReturned"),
             text.control,
             entry=(Bytes("pbSendBuffer", "pbSendBuffer", "cbSendLength"),),
             exit=(Word("lpBytesReturned", "lpBytesReturned"),
                   Bytes("pbRecvBuffer", "pbRecvBuffer", "lpBytesReturned",
                         on_success=True))),
    Function("SCardTransmit",
             ("hCard", "pioSendPci", "pbSendBuffer", "cbSendLength",
              "pioRecvPci", "pbRecvBuffer", "pcbRecvLength"),
             text.transmit,
             entry=(Word("pioSendPci.dwProtocol", "pioSendPci"),
                    Word("pioSendPci.cbPciLength", "pioSendPci", 8),
                    Bytes("pbSendBuffer", "pbSendBuffer", "cbSendLength")),
             exit=(Word("pioRecvPci.dwProtocol", "pioRecvPci"),
                   Word("pioRecvPci.cbPciLength", "pioRecvPci", 8),
                   Word("pcbRecvLength", "pcbRecvLength"),
                   Bytes("pbRecvBuffer", "pbRecvBuffer", "pcbRecvLength",
                         on_success=True))),
    Function("SCardListReaderGroups",
             ("hContext", "mszGroups", "pcchGroups"),
             text.list_reader_groups,
             entry=(Word("pcchGroups", "pcchGroups"),),
             exit=(Word("pcchGroups", "pcchGroups"),
                   Bytes("mszGroups", "mszGroups", "pcchGroups", autoalloc="pcchGroups",
                         on_success=True))),
    Function("SCardListReaders",
             ("hContext", "mszGroups", "mszReaders", "pcchReaders"),
             text.list_readers,
             entry=(Text("mszGroups", "mszGroups"), Word("pcchReaders", "pcchReaders")),
             exit=(Word("pcchReaders", "pcchReaders"),
                   Bytes("mszReaders", "mszReaders", "pcchReaders", autoalloc="pcchReaders",
                         on_success=True))),
    Function("SCardFreeMemory", ("hContext", "pvMem"), text.free_memory),
    Function("SCardCancel", ("hContext",), text.context_only),
    Function("SCardGetAttrib",
             ("hCard", "dwAttrId", "pbAttr", "pcbAttrLen"),
             text.get_attrib,
             entry=(Word("pcbAttrLen", "pcbAttrLen"),),
             exit=(Word("pcbAttrLen", "pcbAttrLen"),
                   Bytes("pbAttr", "pbAttr", "pcbAttrLen", autoalloc="pcbAttrLen",
                         on_success=True))),
    Function("SCardSetAttrib",
             ("hCard", "dwAttrId", "pbAttr", "cbAttrLen"),
             text.set_attrib,
             entry=(Bytes("pbAttr", "pbAttr", "cbAttrLen"),)),
)

BY_NAME = {f.name: f for f in FUNCTIONS}
