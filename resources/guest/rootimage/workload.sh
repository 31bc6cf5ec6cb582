# The Linux density benchmark's workload, run chrooted into the root image by start.sh:
#   run     executes programs from the image (Python importing much of its standard library,
#           perl, coreutils), then reads every file of the image (sha256sum of each, in
#           files.list order) and prints the SHA-256 of those lines, which the host compares
#           with its own;
#   verify  reads every file again (from the page cache, whose pages the host may have
#           merged or mapped from the image since) and prints the SHA-256 again.
# sha256sum reads the files itself (density/hash-files.sh, made with the image): piping them
# through cat would copy each byte three times in the guest kernel, which is emulated on some
# hosts.
export PATH=/usr/bin:/usr/sbin
phase() {
	read -r up _ </proc/uptime
	echo "density: $1 at $up s"
}

if [ "${1:-run}" = run ]; then
	phase "exec phase"
	python3.11 /density/imports.py
	perl -MPOSIX -MFile::Temp -MGetopt::Long -MIO::Socket::IP -MText::Wrap -MFile::Spec \
		-e 'printf "density: perl %vd ran, %d modules\n", $^V, scalar keys %INC'
	ls -lR /usr/lib/python3.11 >/dev/null
	du -s /usr /density >/dev/null
	sort -z -u /density/files.list | wc -c >/dev/null
	phase "read phase"
	sum="$(sh /density/hash-files.sh | sha256sum)"
	echo "density: data sha256 ${sum%% *}"
	phase "workload done"
else
	sum="$(sh /density/hash-files.sh | sha256sum)"
	echo "density: data sha256 after the hold ${sum%% *}"
	phase "verified"
fi
