#!/usr/bin/env bash
# Puts the four gzip'd MNIST IDX files into data/mnist/ under the repository root.
#
# Source: ../shared/data/mnist/ beside the checkout when it exists, otherwise the public mirrors
# below (curl). Every file is checked by the SHA-256 of its DECOMPRESSED content (recompressed
# copies differ byte-wise, the IDX content does not), against ../shared/data/mnist/SHA256SUMS.raw
# when present, else against the checksums embedded here. A file that does not match is deleted
# and the script fails. Idempotent: when all four files are present and verify, nothing changes.
set -euo pipefail
cd "$(dirname "$0")/.."

dest=data/mnist
shared=../shared/data/mnist
names=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
mirrors=(
    https://ossci-datasets.s3.amazonaws.com/mnist/
    https://storage.googleapis.com/cvdf-datasets/mnist/
)

# SHA-256 of the decompressed files (same as ../shared/data/mnist/SHA256SUMS.raw).
embedded_sums="\
0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  t10k-images-idx3-ubyte
ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2  t10k-labels-idx1-ubyte
ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db  train-images-idx3-ubyte
65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5  train-labels-idx1-ubyte"

if [[ -f $shared/SHA256SUMS.raw ]]; then
    sums=$(cat "$shared/SHA256SUMS.raw")
    sums_from=$shared/SHA256SUMS.raw
else
    sums=$embedded_sums
    sums_from="the checksums embedded in $0"
fi

# The expected SHA-256 of the decompressed file NAME.
expected_sum() {
    awk -v n="$1" '$2 == n { print $1 }' <<<"$sums"
}

# Succeeds when FILE (gzip'd when GZ=1) decompresses to the content NAME must have.
verify() { # FILE NAME GZ
    local want got
    want=$(expected_sum "$2")
    if [[ -z $want ]]; then
        echo "fetch-mnist: no checksum for $2 in $sums_from" >&2
        return 1
    fi
    if [[ $3 == 1 ]]; then
        got=$(gzip -dc -- "$1" | sha256sum) || return 1
    else
        got=$(sha256sum <"$1") || return 1
    fi
    [[ ${got%% *} == "$want" ]]
}

tmp=
trap '[[ -z $tmp ]] || rm -f -- "$tmp"' EXIT
mkdir -p "$dest"

# Tries one source for NAME.gz: copies or downloads into a temp file, verifies, renames.
fetch_from() { # NAME SOURCE-KIND SOURCE
    local name=$1 kind=$2 src=$3
    tmp=$(mktemp "$dest/.$name.gz.XXXXXX")
    if [[ $kind == copy ]]; then
        cp -- "$src" "$tmp" || {
            rm -f -- "$tmp"
            return 1
        }
    else
        curl -fsSL --connect-timeout 20 --max-time 600 --retry 2 -o "$tmp" -- "$src" || {
            echo "fetch-mnist: could not download $src" >&2
            rm -f -- "$tmp"
            return 1
        }
    fi
    chmod 644 "$tmp"
    if ! verify "$tmp" "$name" 1; then
        echo "fetch-mnist: REFUSED $src: decompressed SHA-256 does not match $sums_from" >&2
        rm -f -- "$tmp"
        return 1
    fi
    mv -f -- "$tmp" "$dest/$name.gz"
    tmp=
    echo "fetch-mnist: $dest/$name.gz <- $src (verified)"
}

present=0
failed=0
for name in "${names[@]}"; do
    # The readers prefer an uncompressed file when both exist: it must verify too.
    if [[ -f $dest/$name ]] && ! verify "$dest/$name" "$name" 0; then
        echo "fetch-mnist: $dest/$name does not match its checksum; deleting it" >&2
        rm -f -- "$dest/$name"
    fi
    if [[ -f $dest/$name.gz ]]; then
        if verify "$dest/$name.gz" "$name" 1; then
            present=$((present + 1))
            continue
        fi
        echo "fetch-mnist: $dest/$name.gz does not match its checksum; deleting it" >&2
        rm -f -- "$dest/$name.gz"
    fi
    ok=0
    if [[ -f $shared/$name.gz ]] && fetch_from "$name" copy "$shared/$name.gz"; then
        ok=1
    else
        for m in "${mirrors[@]}"; do
            if fetch_from "$name" download "$m$name.gz"; then
                ok=1
                break
            fi
        done
    fi
    if [[ $ok == 0 ]]; then
        echo "fetch-mnist: ERROR: no verified copy of $name.gz" >&2
        failed=1
    fi
done

if [[ $failed == 1 ]]; then
    exit 1
fi
if [[ $present == "${#names[@]}" ]]; then
    echo "fetch-mnist: all four MNIST files already in $dest and verified; nothing to do"
else
    echo "fetch-mnist: MNIST ready in $dest"
fi
