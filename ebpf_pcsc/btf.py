"""Member offsets of kernel structures, read from the running kernel's BTF.

bcc compiles against whatever kernel headers it finds, which need not match
the running kernel (see kheaders.py): a structure read through a pointer
(task_struct in the fork probe) must use the running kernel's layout, which
/sys/kernel/btf/vmlinux describes.  This is a minimal reader of the BTF
format (linux/btf.h): enough to find a struct member's offset.
"""
import struct
from typing import Dict

VMLINUX = "/sys/kernel/btf/vmlinux"

BTF_MAGIC = 0xEB9F
KIND_STRUCT = 4
# Bytes that follow struct btf_type, per kind: a fixed part and a per-vlen part.
_EXTRA = {1: (4, 0), 2: (0, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 7: (0, 0),
          8: (0, 0), 9: (0, 0), 10: (0, 0), 11: (0, 0), 12: (0, 0), 13: (0, 8), 14: (4, 0),
          15: (0, 12), 16: (0, 0), 17: (4, 0), 18: (0, 0), 19: (0, 12)}


class BTFError(Exception):
    pass


def member_offsets(struct_name: str, members, path: str = VMLINUX) -> Dict[str, int]:
    """Byte offsets of `members` in `struct struct_name`."""
    with open(path, "rb") as f:
        blob = f.read()
    header = struct.Struct("<HBBIIIII")
    if len(blob) < header.size:
        raise BTFError("%s is not BTF" % path)
    magic, _version, _flags, hdr_len, type_off, type_len, str_off, _str_len = \
        header.unpack_from(blob)
    if magic != BTF_MAGIC:
        raise BTFError("%s is not BTF" % path)
    types = hdr_len + type_off
    strings = hdr_len + str_off

    def name(off: int) -> str:
        end = blob.index(b"\0", strings + off)
        return blob[strings + off:end].decode()

    pos, end = types, types + type_len
    while pos < end:
        name_off, info, _size = struct.unpack_from("<III", blob, pos)
        kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        pos += 12
        if kind not in _EXTRA:
            raise BTFError("unknown BTF kind %d" % kind)
        fixed, per = _EXTRA[kind]
        if kind == KIND_STRUCT and name(name_off) == struct_name:
            found = {}
            for i in range(vlen):
                m_name, _m_type, m_off = struct.unpack_from("<III", blob, pos + 12 * i)
                bits = m_off & 0xFFFFFF if kind_flag else m_off
                if name(m_name) in members:
                    found[name(m_name)] = bits // 8
            missing = set(members) - set(found)
            if missing:
                raise BTFError("struct %s has no %s" % (struct_name, ", ".join(sorted(missing))))
            return found
        pos += fixed + per * vlen
    raise BTFError("struct %s not found in %s" % (struct_name, path))
