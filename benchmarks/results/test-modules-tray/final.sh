#!/bin/bash
for m in test_ray_study test_cluster; do
  /tmp/work/tray/measure.sh /work/wt/tray-base $m fbase
  /tmp/work/tray/measure.sh /work/wt/tray $m fnew
done
