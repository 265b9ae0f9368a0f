"""PC/SC constants, written once: return codes and their texts, scopes,
share modes, dispositions, protocols, reader states, attributes and control
codes (values from pcsc-lite's pcsclite.h, reader.h and winscard.h)."""

SCARD_AUTOALLOCATE = 0xFFFFFFFFFFFFFFFF  # (DWORD)-1 with an 8-byte DWORD

# code -> (name, text).  The text is what pcsc-lite 1.9.x's
# pcsc_stringify_error() returns, which pcsc-spy prints; codes that function
# does not know get its "Unknown error: 0x%08lX" text (see rv_text()).
_RETURN_CODES = (
    (0x00000000, "SCARD_S_SUCCESS", "Command successful."),
    (0x80100001, "SCARD_F_INTERNAL_ERROR", "Internal error."),
    (0x80100002, "SCARD_E_CANCELLED", "Command cancelled."),
    (0x80100003, "SCARD_E_INVALID_HANDLE", "Invalid handle."),
    (0x80100004, "SCARD_E_INVALID_PARAMETER", "Invalid parameter given."),
    (0x80100005, "SCARD_E_INVALID_TARGET", "Invalid target given."),
    (0x80100006, "SCARD_E_NO_MEMORY", "Not enough memory."),
    (0x80100007, "SCARD_F_WAITED_TOO_LONG", "Waited too long."),
    (0x80100008, "SCARD_E_INSUFFICIENT_BUFFER", "Insufficient buffer."),
    (0x80100009, "SCARD_E_UNKNOWN_READER", "Unknown reader specified."),
    (0x8010000A, "SCARD_E_TIMEOUT", "Command timeout."),
    (0x8010000B, "SCARD_E_SHARING_VIOLATION", "Sharing violation."),
    (0x8010000C, "SCARD_E_NO_SMARTCARD", "No smart card inserted."),
    (0x8010000D, "SCARD_E_UNKNOWN_CARD", "Unknown card."),
    (0x8010000E, "SCARD_E_CANT_DISPOSE", "Cannot dispose handle."),
    (0x8010000F, "SCARD_E_PROTO_MISMATCH", "Card protocol mismatch."),
    (0x80100010, "SCARD_E_NOT_READY", "Subsystem not ready."),
    (0x80100011, "SCARD_E_INVALID_VALUE", "Invalid value given."),
    (0x80100012, "SCARD_E_SYSTEM_CANCELLED", "System cancelled."),
    (0x80100013, "SCARD_F_COMM_ERROR", "RPC transport error."),
    (0x80100014, "SCARD_F_UNKNOWN_ERROR", "Unknown error."),
    (0x80100015, "SCARD_E_INVALID_ATR", "Invalid ATR."),
    (0x80100016, "SCARD_E_NOT_TRANSACTED", "Transaction failed."),
    (0x80100017, "SCARD_E_READER_UNAVAILABLE", "Reader is unavailable."),
    (0x80100018, "SCARD_P_SHUTDOWN", None),
    (0x80100019, "SCARD_E_PCI_TOO_SMALL", "PCI struct too small."),
    (0x8010001A, "SCARD_E_READER_UNSUPPORTED", "Reader is unsupported."),
    (0x8010001B, "SCARD_E_DUPLICATE_READER", "Reader already exists."),
    (0x8010001C, "SCARD_E_CARD_UNSUPPORTED", "Card is unsupported."),
    (0x8010001D, "SCARD_E_NO_SERVICE", "Service not available."),
    (0x8010001E, "SCARD_E_SERVICE_STOPPED", "Service was stopped."),
    (0x8010001F, "SCARD_E_UNSUPPORTED_FEATURE", "Feature not supported."),
    (0x80100020, "SCARD_E_ICC_INSTALLATION", None),
    (0x80100021, "SCARD_E_ICC_CREATEORDER", None),
    (0x80100023, "SCARD_E_DIR_NOT_FOUND", None),
    (0x80100024, "SCARD_E_FILE_NOT_FOUND", None),
    (0x80100025, "SCARD_E_NO_DIR", None),
    (0x80100026, "SCARD_E_NO_FILE", None),
    (0x80100027, "SCARD_E_NO_ACCESS", None),
    (0x80100028, "SCARD_E_WRITE_TOO_MANY", None),
    (0x80100029, "SCARD_E_BAD_SEEK", None),
    (0x8010002A, "SCARD_E_INVALID_CHV", None),
    (0x8010002B, "SCARD_E_UNKNOWN_RES_MNG", None),
    (0x8010002C, "SCARD_E_NO_SUCH_CERTIFICATE", None),
    (0x8010002D, "SCARD_E_CERTIFICATE_UNAVAILABLE", None),
    (0x8010002E, "SCARD_E_NO_READERS_AVAILABLE", "Cannot find a smart card reader."),
    (0x8010002F, "SCARD_E_COMM_DATA_LOST", None),
    (0x80100030, "SCARD_E_NO_KEY_CONTAINER", None),
    (0x80100031, "SCARD_E_SERVER_TOO_BUSY", None),
    (0x80100065, "SCARD_W_UNSUPPORTED_CARD", "Card is not supported."),
    (0x80100066, "SCARD_W_UNRESPONSIVE_CARD", "Card is unresponsive."),
    (0x80100067, "SCARD_W_UNPOWERED_CARD", "Card is unpowered."),
    (0x80100068, "SCARD_W_RESET_CARD", "Card was reset."),
    (0x80100069, "SCARD_W_REMOVED_CARD", "Card was removed."),
    (0x8010006A, "SCARD_W_SECURITY_VIOLATION", "Access denied."),
    (0x8010006B, "SCARD_W_WRONG_CHV", None),
    (0x8010006C, "SCARD_W_CHV_BLOCKED", None),
    (0x8010006D, "SCARD_W_EOF", None),
    (0x8010006E, "SCARD_W_CANCELLED_BY_USER", None),
    (0x8010006F, "SCARD_W_CARD_NOT_AUTHENTICATED", None),
)
RV_NAMES = {code: name for code, name, _ in _RETURN_CODES}
_RV_TEXTS = {code: text for code, _, text in _RETURN_CODES if text}

SCARD_S_SUCCESS = 0


def rv_hex(rv: int) -> str:
    """A LONG result as libpcscspy writes it ("0x%08lX")."""
    return "0x%08X" % (rv & 0xFFFFFFFFFFFFFFFF)


def rv_text(rv: int) -> str:
    """pcsc_stringify_error(rv) of pcsc-lite 1.9.x."""
    return _RV_TEXTS.get(rv, "Unknown error: " + rv_hex(rv))


def rv_name(rv: int) -> str:
    return RV_NAMES.get(rv, "UNKNOWN")


SCOPES = {0: "SCARD_SCOPE_USER", 1: "SCARD_SCOPE_TERMINAL", 2: "SCARD_SCOPE_SYSTEM"}
SHARE_MODES = {1: "SCARD_SHARE_EXCLUSIVE", 2: "SCARD_SHARE_SHARED", 3: "SCARD_SHARE_DIRECT"}
DISPOSITIONS = {0: "SCARD_LEAVE_CARD", 1: "SCARD_RESET_CARD",
                2: "SCARD_UNPOWER_CARD", 3: "SCARD_EJECT_CARD"}

# Protocol bits, in the order pcsc-spy lists them.
PROTOCOLS = ((1, "T=0"), (2, "T=1"), (4, "RAW"), (8, "T=15"))

# Reader state bits, in the order pcsc-spy lists them.  SCARD_STATE_UNAWARE is
# 0: no bit, never listed.
READER_STATES = (
    (0x0001, "SCARD_STATE_IGNORE"), (0x0002, "SCARD_STATE_CHANGED"),
    (0x0004, "SCARD_STATE_UNKNOWN"), (0x0008, "SCARD_STATE_UNAVAILABLE"),
    (0x0010, "SCARD_STATE_EMPTY"), (0x0020, "SCARD_STATE_PRESENT"),
    (0x0040, "SCARD_STATE_ATRMATCH"), (0x0080, "SCARD_STATE_EXCLUSIVE"),
    (0x0100, "SCARD_STATE_INUSE"), (0x0200, "SCARD_STATE_MUTE"),
    (0x0400, "SCARD_STATE_UNPOWERED"),
)
SCARD_STATE_PRESENT = 0x0020

SCARD_ATTR_ATR_STRING = 0x00090303
TAG_IFD_ATR = 0x0303   # ifdhandler.h: the ATR, as a driver (vpcd) answers it

# The attributes pcsc-spy names.
ATTRIBUTES = {
    0x00010100: "SCARD_ATTR_VENDOR_NAME",
    0x00010102: "SCARD_ATTR_VENDOR_IFD_VERSION",
    0x00010103: "SCARD_ATTR_VENDOR_IFD_SERIAL_NO",
    0x0007A007: "SCARD_ATTR_MAXINPUT",
    0x00090300: "SCARD_ATTR_ICC_PRESENCE",
    0x00090301: "SCARD_ATTR_ICC_INTERFACE_STATUS",
    0x00090303: "SCARD_ATTR_ATR_STRING",
    0x7FFF0003: "SCARD_ATTR_DEVICE_FRIENDLY_NAME_A",
    0x7FFF0004: "SCARD_ATTR_DEVICE_SYSTEM_NAME_A",
    0x7FFF0005: "SCARD_ATTR_DEVICE_FRIENDLY_NAME_W",
    0x7FFF0006: "SCARD_ATTR_DEVICE_SYSTEM_NAME_W",
}


def scard_ctl_code(code: int) -> int:
    return 0x42000000 + code


CM_IOCTL_GET_FEATURE_REQUEST = scard_ctl_code(3400)
# libccid numbers a feature's control code SCARD_CTL_CODE(0x330000 + tag).
CCID_CLASS2_IOCTL_MAGIC = 0x330000
CONTROL_CODES = {
    scard_ctl_code(1): "IOCTL_SMARTCARD_VENDOR_IFD_EXCHANGE",
    CM_IOCTL_GET_FEATURE_REQUEST: "CM_IOCTL_GET_FEATURE_REQUEST",
}

# PC/SC v2 part 10 features (tags of CM_IOCTL_GET_FEATURE_REQUEST's answer).
FEATURES = {
    0x01: "FEATURE_VERIFY_PIN_START", 0x02: "FEATURE_VERIFY_PIN_FINISH",
    0x03: "FEATURE_MODIFY_PIN_START", 0x04: "FEATURE_MODIFY_PIN_FINISH",
    0x05: "FEATURE_GET_KEY_PRESSED", 0x06: "FEATURE_VERIFY_PIN_DIRECT",
    0x07: "FEATURE_MODIFY_PIN_DIRECT", 0x08: "FEATURE_MCT_READER_DIRECT",
    0x09: "FEATURE_MCT_UNIVERSAL", 0x0A: "FEATURE_IFD_PIN_PROPERTIES",
    0x0B: "FEATURE_ABORT", 0x0C: "FEATURE_SET_SPE_MESSAGE",
    0x0D: "FEATURE_VERIFY_PIN_DIRECT_APP_ID", 0x0E: "FEATURE_MODIFY_PIN_DIRECT_APP_ID",
    0x0F: "FEATURE_WRITE_DISPLAY", 0x10: "FEATURE_GET_KEY",
    0x11: "FEATURE_IFD_DISPLAY_PROPERTIES", 0x12: "FEATURE_GET_TLV_PROPERTIES",
    0x13: "FEATURE_CCID_ESC_COMMAND",
}

TLV_PROPERTIES = {
    1: "PCSCv2_PART10_PROPERTY_wLcdLayout",
    2: "PCSCv2_PART10_PROPERTY_bEntryValidationCondition",
    3: "PCSCv2_PART10_PROPERTY_bTimeOut2",
    4: "PCSCv2_PART10_PROPERTY_wLcdMaxCharacters",
    5: "PCSCv2_PART10_PROPERTY_wLcdMaxLines",
    6: "PCSCv2_PART10_PROPERTY_bMinPINSize",
    7: "PCSCv2_PART10_PROPERTY_bMaxPINSize",
    8: "PCSCv2_PART10_PROPERTY_sFirmwareID",
    9: "PCSCv2_PART10_PROPERTY_bPPDUSupport",
}

MAX_ATR_SIZE = 33
