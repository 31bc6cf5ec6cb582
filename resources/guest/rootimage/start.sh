# The Linux density benchmark's guest side (scripts/bench-linux-density.sh), run by the
# guest's /init (samepage.script=density/start.sh) with the root image mounted read-only on
# /mnt: runs the workload chrooted into the image, waits for the page hints, holds, checks the
# files again and leaves the exit status to /init. Lines starting "density:" are read by the
# benchmark.
#
# Kernel command line:
#   density.hints=off      unbind the fphash driver first, so the guest hashes nothing in
#                          modes that do not use hints (only this script's page was read)
#   density.hint_wait=S    wait at most S seconds after the workload for the driver to send
#                          every report it queued (default 0)
#   density.hold=S         then keep the guest's memory S seconds (default 0)
#   density.need_hash=M    stop at once (exit 3) unless the driver's hashing in force is M
#                          (host or guest): a mode this kernel or VMM cannot run costs a boot,
#                          not a whole workload
#
# On a host that emulates kernel code every fork+exec costs ~0.5 s: builtins where possible.

now() { read -r up _ </proc/uptime; }
hints=on
hint_wait=0
hold=0
need_hash=
read -r cmdline </proc/cmdline
for arg in $cmdline; do
	case "$arg" in
	density.hints=*) hints="${arg#*=}" ;;
	density.hint_wait=*) hint_wait="${arg#*=}" ;;
	density.hold=*) hold="${arg#*=}" ;;
	density.need_hash=*) need_hash="${arg#*=}" ;;
	esac
done

driver=/sys/bus/virtio/drivers/virtio_fphash
dev=
for d in "$driver"/virtio*; do [ -e "$d" ] && dev="${d##*/}"; done
# Who hashes reported pages: the driver's mode in force where it has one (protocol version 2:
# host or guest), else the guest (a version-1 driver); the hash= parameter as given, if any.
param=none
for p in /sys/module/fphash/parameters/hash /sys/module/virtio_fphash/parameters/hash; do
	[ -r "$p" ] && read -r param <"$p"
done
hash=none
if [ -n "$dev" ]; then
	hash=guest
	[ -r "/sys/bus/virtio/devices/$dev/fphash/hash" ] && read -r hash <"/sys/bus/virtio/devices/$dev/fphash/hash"
fi
echo "density: fphash device ${dev:-none} hints=$hints hash=$hash hash_param=$param"
if [ -n "$need_hash" ] && [ "$hints" != off ] && [ "$hash" != "$need_hash" ]; then
	echo "density: hashing in force is $hash, not $need_hash: stopping"
	exit 3
fi
if [ "$hints" = off ] && [ -n "$dev" ]; then
	echo "$dev" >"$driver/unbind" && echo "density: fphash driver unbound"
	dev=
fi

mount -t devtmpfs dev /mnt/dev
mount -t proc proc /mnt/proc
now
echo "density: workload starts at $up s"
busybox chroot /mnt /bin/sh /density/workload.sh run
status=$?

counters() {
	[ -n "$dev" ] || return 0
	line="density: fphash$1"
	for c in queued dropped stale hashed hash_us records merged already mismatch no_room off pending; do
		read -r v <"/sys/bus/virtio/devices/$dev/fphash/$c"
		line="$line $c=$v"
	done
	echo "$line"
}
if [ -n "$dev" ]; then
	counters " after the workload:"
	now
	deadline=$((${up%.*} + hint_wait))
	while :; do
		read -r pending <"/sys/bus/virtio/devices/$dev/fphash/pending"
		[ "$pending" = 0 ] && break
		now
		[ "${up%.*}" -ge "$deadline" ] && break
		sleep 2
	done
	now
	echo "density: hints settled at $up s (pending $pending)"
	counters ":"
fi

now
echo "density: holding ${hold} s from $up s"
[ "$hold" = 0 ] || sleep "$hold"
busybox chroot /mnt /bin/sh /density/workload.sh verify || status=1
counters " at the end:"
exit "$status"
