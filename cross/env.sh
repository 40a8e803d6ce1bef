# Sourced by cross/build.sh and cross/test.sh: `cross_env TARGET` installs
# what building for TARGET needs (the rustup target; Debian's cross gcc)
# and exports the compiler, linker and runner variables cargo and ring
# read. Runner: qemu (`apt-get install qemu-user`) with the target's
# libraries.
cross_env() {
    local target="$1" gnu pkg runner
    case "$target" in
        aarch64-unknown-linux-gnu)
            gnu=aarch64-linux-gnu; pkg=gcc-aarch64-linux-gnu
            runner="qemu-aarch64 -L /usr/aarch64-linux-gnu" ;;
        aarch64-unknown-linux-musl)
            gnu=aarch64-linux-gnu; pkg=gcc-aarch64-linux-gnu; runner="qemu-aarch64" ;;
        x86_64-unknown-linux-musl)
            # The amd64 package's static build: native, no emulator.
            gnu=x86_64-linux-gnu; pkg=gcc; runner="" ;;
        armv7-unknown-linux-gnueabihf)
            gnu=arm-linux-gnueabihf; pkg=gcc-arm-linux-gnueabihf
            runner="qemu-arm -L /usr/arm-linux-gnueabihf" ;;
        *) echo "cross: unknown target '$target' (aarch64-unknown-linux-gnu, aarch64-unknown-linux-musl, armv7-unknown-linux-gnueabihf, x86_64-unknown-linux-musl)" >&2
           return 64 ;;
    esac
    if ! rustup target list --installed | grep -qx "$target"; then
        rustup target add "$target" >&2
    fi
    local missing=()
    command -v "$gnu-gcc" >/dev/null || missing+=("$pkg")
    if [ -n "$runner" ]; then
        command -v "${runner%% *}" >/dev/null || missing+=(qemu-user)
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "cross: installing ${missing[*]} (apt)" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    fi
    local upper lower
    upper="$(echo "$target" | tr 'a-z-' 'A-Z_')"
    lower="$(echo "$target" | tr '-' '_')"
    # ring builds its C and assembly with the target's gcc; gcc links.
    export "CC_$lower=$gnu-gcc" "AR_$lower=$gnu-ar"
    export "CARGO_TARGET_${upper}_LINKER=$gnu-gcc"
    if [ -n "$runner" ]; then
        export "CARGO_TARGET_${upper}_RUNNER=$runner"
    fi
    case "$target" in
        # Static: Rust's own musl C runtime, linked without glibc's start files.
        *-musl) export "CARGO_TARGET_${upper}_RUSTFLAGS=-C target-feature=+crt-static -C link-self-contained=yes" ;;
    esac
    CROSS_RUNNER="$runner"
}
