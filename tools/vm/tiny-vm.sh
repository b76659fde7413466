#!/usr/bin/env bash
# A tiny VM for lab tests: Debian's 6.1 cloud kernel + a busybox initramfs, booted by QEMU (TCG is
# enough: the VM boots in a few seconds). The 6.1 series because its modules are plain .ko files that
# busybox insmod loads (6.12 ships .ko.xz). Needs: qemu-system-x86 busybox-static (its cpio), apt access.
#   tools/vm/tiny-vm.sh build DIR      -> DIR/vmlinuz, DIR/initrd.gz (kept while this script is unchanged)
# The VM loads virtio-net, asks DHCP on eth0 with udhcpc and prints one line on its console:
#   VM-LEASE ip=10.1.0.5 mask=24 router=10.1.0.1 dns=... mtu=1450 routes=<option 121> domain=... lease=...
# then applies it (address, routes, MTU, resolv.conf) and runs a shell on the console
# (`tether.lab.vm` drives it). Booted e.g. by
#   qemu-system-x86_64 -m 256 -nographic -no-reboot -kernel DIR/vmlinuz -initrd DIR/initrd.gz \
#     -append "console=ttyS0 quiet panic=-1" \
#     -netdev tap,id=n0,ifname=TAP,script=no,downscript=no -device virtio-net-pci,netdev=n0,mac=MAC
set -euo pipefail
[ "${1:-}" = build ] && [ -n "${2:-}" ] || { sed -n 2,13p "$0"; exit 2; }
out=$(realpath -m "$2")
stamp=$(sha256sum "$0" | cut -c1-16)  # a changed recipe builds again
[ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ] && [ "$(cat "$out/recipe" 2>/dev/null)" = "$stamp" ] && {
  echo "$out/vmlinuz $out/initrd.gz"; exit 0; }
for tool in apt-get dpkg-deb gzip busybox; do
  command -v "$tool" >/dev/null || { echo "tiny-vm: $tool is missing (scripts/install-deps installs it)" >&2; exit 1; }
done
file -L "$(command -v busybox)" 2>/dev/null | grep -q 'statically linked' || [ ! -x /usr/bin/file ] || {
  echo "tiny-vm: busybox is not the static build; install busybox-static" >&2; exit 1; }
mkdir -p "$out"; work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$work"
pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' | awk '{print $1}' | sort -V | tail -1)
[ -n "$pkg" ] || { echo "tiny-vm: no linux-image-6.1.0-*-cloud-amd64 in apt (run apt-get update?)" >&2; exit 1; }
apt-get download -qq "$pkg"
dpkg-deb -x ./*.deb root
K=$(ls -d root/lib/modules/*/kernel)
mkdir -p initrd/bin initrd/lib/modules initrd/etc
cp "$(command -v busybox)" initrd/bin/busybox
for m in drivers/virtio/virtio drivers/virtio/virtio_ring drivers/virtio/virtio_pci_legacy_dev \
         drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci net/core/failover \
         drivers/net/net_failover drivers/net/virtio_net; do
  [ -f "$K/$m.ko" ] && cp "$K/$m.ko" initrd/lib/modules/
done
cat > initrd/lease.sh <<'LEASE'
#!/bin/sh
# udhcpc's script: print what the lease gave, then apply it (option 121 replaces the router, RFC 3442)
[ "$1" = bound ] || [ "$1" = renew ] || exit 0
echo "VM-LEASE ip=$ip mask=$mask router=$router dns=$(echo $dns) mtu=$mtu routes=$(echo $staticroutes) domain=$domain lease=$lease"
ip addr flush dev "$interface"
ip addr add "$ip/$mask" dev "$interface"
[ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
if [ -n "$staticroutes" ]; then
  set -- $staticroutes
  while [ $# -ge 2 ]; do
    if [ "$2" = 0.0.0.0 ]; then ip route add "$1" dev "$interface"; else ip route add "$1" via "$2" dev "$interface"; fi
    shift 2
  done
elif [ -n "$router" ]; then
  for r in $router; do ip route add default via "$r" dev "$interface"; break; done
fi
: > /etc/resolv.conf
for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
exit 0
LEASE
cat > initrd/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp; mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net; do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko; done
ip link set lo up; ip link set eth0 up
udhcpc -i eth0 -n -q -t 10 -T 2 -O mtu -O staticroutes -O domain -s /lease.sh || echo "VM-NO-LEASE"
echo "VM-READY"
exec sh
INIT
chmod +x initrd/init initrd/lease.sh
(cd initrd && find . | busybox cpio -o -H newc 2>/dev/null | gzip) > "$out/initrd.gz.tmp"
cp root/boot/vmlinuz-* "$out/vmlinuz.tmp"
mv "$out/initrd.gz.tmp" "$out/initrd.gz"; mv "$out/vmlinuz.tmp" "$out/vmlinuz"; echo "$stamp" > "$out/recipe"
echo "$out/vmlinuz $out/initrd.gz"
