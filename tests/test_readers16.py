"""SCARD_READERSTATE arrays in and out, 16 readers (the issue's minimum)."""


def test_sixteen_reader_states_in_and_out(stack, client_bin, tracer):
    t = tracer("-n", "-d")
    run = stack.run([client_bin, "readers16"])
    assert run.returncode == 0, run.stderr
    res = t.stop()
    lines = res.stdout.splitlines()
    start = lines.index("SCardGetStatusChange")
    call = lines[start:lines.index(" => Command successful. (SCARD_S_SUCCESS [0x00000000])  [??.??]",
                                   start) + 1]
    names = ["Virtual PCD 00 %02d" % (i % 2) for i in range(16)]
    assert " i cReaders: 16" in call
    for direction in "io":
        shown = [l[len(" %s szReader: " % direction):] for l in call
                 if l.startswith(" %s szReader: " % direction)]
        assert shown == names
    # Each entry: 5 lines (name, two states, ATR length, ATR).
    ins = [l for l in call if l.startswith(" i ")]
    outs = [l for l in call if l.startswith(" o ")]
    assert len(ins) == 3 + 16 * 5 and len(outs) == 16 * 5
    ghost_in = ins[3 + 5 * 15:3 + 5 * 16]
    assert ghost_in[1] == " i  dwCurrentState: SCARD_STATE_IGNORE (0x00000001)"
    first_out = outs[:5]
    assert "SCARD_STATE_PRESENT" in first_out[2]
    assert first_out[3:] == [" o  Atr length: 0x00000005 (5)", " o  Atr: 3B 80 80 01 01"]
